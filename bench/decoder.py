"""The decoder pass on its own: the served forms against v2's, layer by layer and whole.

    python -m bench.decoder                 # one torch thread, as the service runs a pass
    python -m bench.decoder --rounds 60     # steadier medians

Every figure is µs per row, the median of `--rounds` interleaved rounds (each form in turn, so
a slow spell of a shared machine hits them all), measured in this run, on this machine. The
whole-pass table compares, at 32 rows (a busy server's pass), 4 rows (the smallest exact pass
on an AVX2 host) and 1 row:

- v2 and v3 as served (TorchScript of the training modules; v3's decoder is v1's, as v2's);
- v4 as served: the same weights in the serving form (trainer/fast_decoder.py), TorchScript,
  its torch.export program, and both with its weights converted to bf16 once (where this CPU
  has no native bf16, that figure only says what emulation costs);

and the layer tables put each layer of the training Decoder beside its serving form, plus the
candidates that were measured and not kept (a sub-pixel 3x3 convolution for each transposed
one, a GEMM form of the encoder's convolutions).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service import artifact
from trainer.export import eager_servable, infer_config
from trainer.model import Decoder

ROOT = Path(__file__).resolve().parents[1]
ROWS = (32, 4, 1)


def timed(forms: dict[str, Callable[[Tensor], Any]], x: Tensor, rounds: int, calls: int) -> dict[str, float]:
    """µs per row of each form on x: the median over rounds of `calls` back-to-back calls."""
    samples: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        for f in forms.values():
            for _ in range(5):
                f(x)
        for _ in range(rounds):
            for name, f in forms.items():
                started = time.perf_counter()
                for _ in range(calls):
                    f(x)
                samples[name].append((time.perf_counter() - started) / calls)
    return {name: 1e6 * statistics.median(t) / len(x) for name, t in samples.items()}


def subpixel_3x3(conv: nn.ConvTranspose2d) -> Callable[[Tensor], Tensor]:
    """The candidate of issue 26's probe: a transposed convolution (k 4, s 2, p 1) as a 3x3
    convolution to 4x the channels and a pixel shuffle (channels-first)."""
    w, b = conv.weight.detach(), conv.bias.detach()
    cin, cout = w.shape[:2]
    k = torch.zeros(cout, 2, 2, cin, 3, 3)
    taps = {0: {-1: 3, 0: 1}, 1: {0: 2, 1: 0}}  # parity -> {offset: kernel tap}
    for a in (0, 1):
        for dy, ky in taps[a].items():
            for c in (0, 1):
                for dx, kx in taps[c].items():
                    k[:, a, c, :, dy + 1, dx + 1] = w[:, :, ky, kx].T
    weight, bias = k.reshape(4 * cout, cin, 3, 3), b.repeat_interleave(4)
    return lambda x: F.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), 2)


def layer_table(
    decoder: Decoder, fast: nn.Module, rows: int, rounds: int
) -> list[tuple[str, float, float, str]]:
    """(layer, training form µs/row, serving form µs/row, note) for each layer, on the
    activations the decoder really produces (from random latents)."""
    z = torch.randn(rows, decoder.net[0].in_features)
    table = []
    trained = list(decoder.net)
    served = list(fast.net)
    x, y = z, z
    with torch.inference_mode():
        j = 0
        for layer in trained:
            if isinstance(layer, nn.Unflatten):
                x = layer(x)
                continue
            form = served[j]
            j += 1
            # Each form on its own activations (the serving form's are channels-last), in turn
            here = y
            figures = timed(
                {"t": layer, "s": lambda _, f=form, a=here: f(a)}, x, rounds, 5 if rows > 1 else 20
            )
            note = ""
            if isinstance(layer, nn.ConvTranspose2d):
                sub = timed({"p": subpixel_3x3(layer)}, x, max(rounds // 2, 3), 5 if rows > 1 else 20)["p"]
                note = f"sub-pixel 3x3 candidate {sub:.1f}"
            name = type(layer).__name__ + (
                f" {layer.in_features}->{layer.out_features}" if isinstance(layer, nn.Linear) else ""
            )
            if isinstance(layer, nn.ConvTranspose2d):
                name += f" {layer.in_channels}->{layer.out_channels}"
            table.append((name, figures["t"], figures["s"], note))
            x = layer(x)
            y = form(y)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", DeprecationWarning)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU capability {capability}")
    v2, _ = artifact.load(artifact.resolve(args.store, "mnist", "v2"))
    v3, _ = artifact.load(artifact.resolve(args.store, "mnist", "v3"))
    v4, art4 = artifact.load(artifact.resolve(args.store, "mnist", "v4"))
    programs = artifact.load_programs(art4)
    v4_bf16 = artifact.load(art4.path)[0].to(torch.bfloat16)
    program_bf16 = artifact.load_programs(art4)["decode"].to(torch.bfloat16)
    forms: dict[str, Callable[[Tensor], Any]] = {
        "v2 as served": v2.decode,
        "v3 as served": v3.decode,
        "v4 TorchScript": v4.decode,
        "v4 torch.export": programs["decode"],
        "v4 TorchScript bf16": lambda z: v4_bf16.decode(z.to(torch.bfloat16)),
        "v4 torch.export bf16": lambda z: program_bf16(z.to(torch.bfloat16)),
    }
    print("\nWhole decoder pass, µs per row (ratio to v2 as served, same run)")
    print(f"{'form':24s}" + "".join(f"{f'{r} rows':>18s}" for r in ROWS))
    results = {r: timed(forms, torch.randn(r, 32), args.rounds, 5 if r > 1 else 20) for r in ROWS}
    for name in forms:
        cells = "".join(
            f"{results[r][name]:9.1f} ({results[r][name] / results[r]['v2 as served']:.2f}x)" for r in ROWS
        )
        print(f"{name:24s}{cells}")
    servable = eager_servable(v3)  # the serving form, from v3's weights (v4's)
    trained = Decoder(infer_config(v3.decoder.state_dict(), v3.encoder.state_dict()))
    trained.load_state_dict(v3.decoder.state_dict())
    for rows in (32, 1):
        print(f"\nLayer by layer at {rows} row(s), µs per row: training form (v3's) | serving form (v4's)")
        for name, t, s, note in layer_table(trained.eval(), servable.decoder, rows, max(args.rounds // 3, 5)):
            print(f"  {name:28s} {t:8.1f} | {s:8.1f}  {note}")
    encoder_gemm = _encoder_gemm_candidate(v3)
    print("\nEncoder pass, µs per row (kept as trained: the GEMM form of its convolutions did not pay)")
    for rows in (32, 1):
        figures = timed(
            {"as trained": v3.encode, "GEMM candidate": encoder_gemm},
            torch.rand(rows, 1, 28, 28),
            args.rounds,
            5,
        )
        print(f"  {rows:2d} rows: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))


def _encoder_gemm_candidate(model: torch.jit.ScriptModule) -> Callable[[Tensor], Any]:
    """The encoder's strided convolutions as unfold + GEMM, channels-last: measured, not kept."""
    sd = model.encoder.state_dict()
    w0 = sd["net.0.weight"].reshape(sd["net.0.weight"].shape[0], -1).t().contiguous()
    w2 = sd["net.2.weight"].reshape(sd["net.2.weight"].shape[0], -1).t().contiguous()
    c2 = sd["net.2.weight"].shape[0]
    hidden = sd["net.5.weight"].shape[0]
    w5 = sd["net.5.weight"].view(hidden, c2, 7, 7).permute(0, 2, 3, 1).reshape(hidden, -1).t().contiguous()

    def conv(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        n, h, wd, c = x.shape
        patches = F.pad(x, (0, 0, 1, 1, 1, 1)).unfold(1, 4, 2).unfold(2, 4, 2)
        return torch.addmm(b, patches.reshape(-1, c * 16), w).view(n, h // 2, wd // 2, -1)

    def encode(x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.silu(conv(x.reshape(-1, 28, 28, 1), w0, sd["net.0.bias"]))
        h = F.silu(conv(h, w2, sd["net.2.bias"])).reshape(len(x), -1)
        h = torch.addmm(
            sd["net.7.bias"], F.silu(torch.addmm(sd["net.5.bias"], h, w5)), sd["net.7.weight"].t()
        )
        mu, pre = h.chunk(2, dim=1)
        return mu, F.softplus(pre) + 1e-4

    return encode


if __name__ == "__main__":
    main()
