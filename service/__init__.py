"""The VAE model service: a FastAPI app over TorchScript artifacts in a model store.

Its layers, each using only those above it in this list (tests/service/test_architecture.py):

    settings, errors, metrics, artifact   foundations; artifact owns the artifact's format
    model/    the model runtime: load and verify (runtime), merge requests into passes
              (batching), run them off the event loop (inference), fail safely (faults),
              serve new versions (reload), and what one app instance holds (state)
    edge/     the HTTP edge, as ASGI middlewares: admission (overload), auth (the API key),
              body_limit, request_metrics
    api/      the API: routes and admin routes, schemas, inputs (requests to arrays),
              images (decode and PNG), responses (arrays to JSON, PNG or .npy), explorer
    app       create_app wires them; warmup runs first requests; cli is vae-serve

The client is a package of its own (client/vae_client), which the service uses only for
its image-array helpers; the trainer is never imported.
"""
