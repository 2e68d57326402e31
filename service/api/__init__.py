"""The API: routes, their schemas, request inputs, responses and the explorer page."""
