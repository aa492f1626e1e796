"""The LoRA kernel lever, measured: the C kernel (mux/csrc/lora.c, the CPU default) vs torch's layouts:
gathered blocks, a segment GEMM, and runs of one slot served as segments.

Per scenario it times one decoder layer's seven SmolLM2-shaped LoRA layers (q,k,v,o,gate,up,down; rank 8)
for each kernel layout, cycling over 30 layers' pools (each slot's rank rows scattered over the pool, as pages
lie) so the weights come from memory as in a real step. The segment GEMM is `torch._grouped_mm` (rows
sorted by slot, one GEMM per slot inside one call). Run: python -m bench.lora_kernel
"""

from __future__ import annotations

import json
import random
from functools import partial

import torch

from bench.common import best_time, group_rows, machine, save
from mux import native
from mux.engine.torch_thread import TorchThread
from mux.lora.ops import LoRABatch, build_lora_batch, lora_add_, native_rows, stacked_pool

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
LAYERS, SLOTS, RANK = 30, 32, 8
SCENARIOS = {  # name -> token slots of one step, decodes sorted by slot and then prefill chunks, as the runner does
    "decode 64 tokens, 16 adapters x4": sorted(i % 16 for i in range(64)),
    "decode 48 tokens, 32 adapters (Zipf)": None,
    "decode 64 tokens, 1 adapter": [0] * 64,
    "decode 16 tokens, 2 far-apart slots": sorted([0, 31] * 8),
    "prefill 4 x 30 tokens, 4 adapters": [s for s in range(4) for _ in range(30)],
    "prefill 64 x 30 tokens, 16 adapters": sorted(s % 16 for s in range(64) for _ in range(30)),
    "prefill 32 x 30 tokens, 32 adapters": [s for s in range(32) for _ in range(30)],
    "serving step: 18 decodes on 14 adapters + 3 x 30 prefill": sorted([*range(14), 0, 0, 1, 2])
    + [s for s in (0, 9, 20) for _ in range(30)],
}


def zipf_slots(n: int, slots: int, seed: int = 0) -> list[int]:
    rnd = random.Random(seed)
    return rnd.choices(range(slots), weights=[1 / (i + 1) for i in range(slots)], k=n)


def blocked_step(xs, ys, stacks, batch) -> None:
    for (i, o), (_, _, pool) in _layers(stacks):
        lora_add_(ys[o], xs[i], *pool, batch)


def segment_step(xs, ys, stacks, order, offs) -> None:
    for (i, o), (a, b, _) in _layers(stacks):
        x = xs[i].index_select(0, order)  # rows sorted by slot
        h = torch._grouped_mm(x, a.transpose(1, 2), offs=offs)  # [T, r]
        ys[o].index_add_(0, order, torch._grouped_mm(h, b, offs=offs))


def run() -> dict:
    torch.manual_seed(0)
    stacks = [[_slots(SLOTS, RANK, i, o) for i, o in SHAPES] for _ in range(LAYERS)]
    SCENARIOS["decode 48 tokens, 32 adapters (Zipf)"] = sorted(zipf_slots(48, SLOTS))
    results = {}
    for name, token_slots in SCENARIOS.items():
        groups = group_rows(token_slots)
        forced = {"gathered": build_lora_batch(groups, RANK, "cpu", segment_rows=None)}
        forced["runs in place + picked"] = build_lora_batch(groups, RANK, "cpu")
        if native.library() is not None:
            forced["native (C)"] = build_lora_batch(groups, RANK, "cpu", use_native=True)
        order = torch.tensor(sorted(range(len(token_slots)), key=lambda t: token_slots[t]))
        offs = torch.bincount(torch.tensor(token_slots), minlength=SLOTS).cumsum(0).to(torch.int32)
        xs = {i: torch.randn(len(token_slots), i) for i in {s[0] for s in SHAPES}}
        ys = {o: torch.zeros(len(token_slots), o) for o in {s[1] for s in SHAPES}}
        kernels = {layout: partial(blocked_step, xs, ys, stacks, batch) for layout, batch in forced.items()}
        kernels["segment (grouped_mm)"] = partial(segment_step, xs, ys, stacks, order, offs)
        times = {label: best_time(fn) / LAYERS * 1e6 for label, fn in kernels.items()}
        results[name] = {"us_per_decoder_layer": times}
        print(name, json.dumps(results[name]), flush=True)
    return results


def rank_rows() -> dict:
    """The C kernel's rank rule (`NATIVE_MAX_RUN_RANK`), side by side: 16 prefills of 30 tokens (runs of one slot) and
    16 x 4 decodes at ranks 8, 16 and 32: torch's kernel, the C kernel on every row, and the dispatch the engine uses
    (C, but runs of >= 8 rows above rank 8 in torch's layouts)."""
    out = {}
    for rank in (8, 16, 32):
        stacks = [[_slots(16, rank, i, o) for i, o in SHAPES] for _ in range(LAYERS)]
        for step, per in (("prefill 16 x 30 tokens", 30), ("decode 16 x 4 tokens", 4)):
            token_slots = [s for s in range(16) for _ in range(per)]
            groups = group_rows(token_slots)
            every_row = native_rows(groups, dict.fromkeys(groups, rank))
            batches = {
                "torch": build_lora_batch(groups, rank, "cpu"),
                "C, every row": LoRABatch((), None, None, None, None, 0, rank, every_row),
                "dispatch": build_lora_batch(groups, rank, "cpu", use_native=True),
            }
            xs = {i: torch.randn(len(token_slots), i) for i in {s[0] for s in SHAPES}}
            ys = {o: torch.zeros(len(token_slots), o) for o in {s[1] for s in SHAPES}}
            fns = {label: partial(blocked_step, xs, ys, stacks, batch) for label, batch in batches.items()}
            out[f"rank {rank}, {step}"] = {label: best_time(fn, 3) * 1e3 for label, fn in fns.items()}
            print(f"rank {rank}, {step}", json.dumps(out[f"rank {rank}, {step}"]), flush=True)
    return out


def _slots(slots: int, rank: int, i: int, o: int) -> tuple:
    """(a [S, R, in], b [S, R, out], their pool and table with the rank rows scattered)"""
    a, b = torch.randn(slots, rank, i) * 0.02, torch.randn(slots, rank, o) * 0.02
    return a, b, stacked_pool(a, b, shuffle=0)


def _layers(stacks):
    return [(shape, ab) for layer in stacks for shape, ab in zip(SHAPES, layer, strict=True)]


def main() -> None:
    thread = TorchThread("bench")  # one OpenMP team for both parts
    results = thread.call(run)
    ranks = thread.call(rank_rows) if native.library() is not None else {}
    lines = [
        f"# LoRA kernel layouts ({SLOTS} slots, rank {RANK}, SmolLM2 shapes, weights cycled over {LAYERS} layers)",
        "",
        f"Machine: {json.dumps(machine())}",
        "",
        "µs per decoder layer (7 LoRA layers).",
        "",
        "Rows sorted by slot as the runner sorts them. Gathered: blocks of one slot, A and B gathered from the pool.",
        "Runs in place + picked: the torch kernel, runs of >= 8 rows of one slot as two matmuls on views where the",
        "cost model takes them, the other rows in the layout it picks. Native (C): `mux/csrc/lora.c`, every row at its",
        "slot's rank, each used slot's weights read in place (the CPU float32 default; -: no C compiler).",
        "",
        "| step | gathered | segment (grouped_mm) | runs in place + picked | native (C) | torch's best / native |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t = r["us_per_decoder_layer"]
        c = t.get("native (C)")
        best_torch = min(v for k, v in t.items() if k != "native (C)")
        lines.append(
            f"| {name} | {t['gathered']:.0f} | {t['segment (grouped_mm)']:.0f} | "
            f"{t['runs in place + picked']:.0f} | {'-' if c is None else f'{c:.0f}'} | "
            f"{'-' if c is None else f'{best_torch / c:.2f}x'} |"
        )
    if ranks:
        lines += [
            "",
            "The C kernel's rank rule: ms per step (30 layers), 16 slots. Dispatch = the engine's: C, but runs of >= 8",
            "rows of a slot above rank 8 in torch's layouts.",
            "",
            "| rank, step | torch | C, every row | dispatch |",
            "|---|---|---|---|",
            *(f"| {k} | {v['torch']:.1f} | {v['C, every row']:.1f} | {v['dispatch']:.1f} |" for k, v in ranks.items()),
        ]
    data = {"machine": machine(), "results": results, "rank_rows_ms_per_step": ranks}
    print("wrote", save("lora-kernel", data, "\n".join(lines)))


if __name__ == "__main__":
    main()
