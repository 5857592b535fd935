"""Retrieval at scale: exact (flat) vs HNSW vs IVF on normalised 1152-d vectors, and MedSigLIP embedding
throughput (medgem vs transformers on the same weights). Writes benchmarks/results/retrieval.json.

Part `ann`: unit vectors of MedSigLIP's width, inner product, two datasets:
- `random`: uniform on the sphere, queries too (what the issue asks). Every point is then almost
  equally far from a query (cosines ~N(0, 1/1152)), so the true top 10 is a near-tie that no index
  can find without scanning: the worst case, reported as measured.
- `lowrank`: points near a random 32-dimensional subspace plus noise, queries drawn alike; a stand-in
  for real embeddings, whose intrinsic dimension is low, so neighbourhoods exist.
`int8` is medgem's own index kind (retrieval/scan.py through the FAISS store): the flat vectors,
searched by an int8 matrix-multiply scan that keeps candidates, ranked exactly in fp32.
Flat (exact), int8 and IVF use all N vectors; HNSW uses the first `--hnsw-n` (its build is the slowest part
on 2 cores). Recall@10 is against the exact top 10 of the same vectors; QPS is for the whole query set
searched in one batched call on `--threads` threads. Indexes are built one after another, freeing
each, so peak memory is about one copy of the vectors (4.6 GB at 1M).

Part `embed`: MedSigLIP-448 shapes (So400m towers, 448 px, 64 text tokens) with random weights;
images/s and texts/s of medgem's SiglipModel vs transformers' SiglipModel, same weights, alternating.

    .venv/bin/python benchmarks/retrieval.py ann --n 1000000 --queries 1000 --skip-ivf --tag 1m   # flat vs int8
    .venv/bin/python benchmarks/retrieval.py ann [--n 1000000] [--hnsw-n 1000000] [--queries 200] [--threads 2]
    .venv/bin/python benchmarks/retrieval.py embed [--layers 27] [--images 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "retrieval.json"
DIM = 1152
CHUNK = 50_000


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sample(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "random":
        return unit_rows(rng.standard_normal((n, DIM), dtype=np.float32))
    basis = np.random.default_rng(99).standard_normal((32, DIM), dtype=np.float32) / np.sqrt(32)
    return unit_rows(rng.standard_normal((n, 32), dtype=np.float32) @ basis
                     + 0.1 * rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM))


def database_chunks(kind: str, n: int):
    """The same N vectors every time they are asked for, CHUNK rows at a time (never all in memory twice)."""
    rng = np.random.default_rng(0)
    for start in range(0, n, CHUNK):
        yield sample(kind, rng, min(CHUNK, n - start))


def fill(index, kind: str, n: int) -> float:
    start = time.perf_counter()
    for chunk in database_chunks(kind, n):
        index.add(chunk)
    return time.perf_counter() - start


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, len(queries) / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def exact(kind: str, n: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
    import faiss

    flat = faiss.IndexFlatIP(DIM)
    build = fill(flat, kind, n)
    truth, qps = timed_search(flat, queries, k)
    return truth, {"n": n, "build_s": build, "qps": qps, "recall@10": 1.0}


def int8_scan(kind: str, n: int, queries: np.ndarray, k: int, truth: np.ndarray) -> dict:
    """medgem's `int8` index kind (FaissStore: flat vectors, int8 scan, exact rerank), as the product runs it."""
    import tempfile

    from medgem.retrieval.store import FaissStore

    with tempfile.TemporaryDirectory() as tmp:
        store = FaissStore(Path(tmp) / "int8.faiss", DIM, "int8")
        start = time.perf_counter()
        done = 0
        for chunk in database_chunks(kind, n):
            store.apply(np.arange(done, done + len(chunk)), chunk, np.array([], dtype=np.int64))
            done += len(chunk)
        fill_s = time.perf_counter() - start
        start = time.perf_counter()
        store.search(queries[:1], k)  # builds the int8 copy
        build_s = fill_s + time.perf_counter() - start
        ids, qps = timed_search(store, queries, k)
    return {"n": n, "build_s": build_s, "int8_copy_s": build_s - fill_s, "qps": qps, "recall@10": recall(ids, truth)}


def run_ann(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    k = 10
    out: dict = {"n": args.n, "hnsw_n": args.hnsw_n, "dim": DIM, "queries": args.queries, "k": k,
                 "threads": args.threads, "faiss": faiss.__version__}
    for kind in args.datasets.split(","):
        queries = sample(kind, np.random.default_rng(1), args.queries)
        result: dict = {}
        truth, result["flat"] = exact(kind, args.n, queries, k)
        print(kind, "flat", result["flat"], flush=True)
        gc.collect()

        result["int8"] = int8_scan(kind, args.n, queries, k, truth)
        print(kind, "int8", result["int8"], flush=True)
        gc.collect()
        if args.skip_ivf:
            out[kind] = result
            continue

        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, args.nlist, faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        ivf.train(sample(kind, np.random.default_rng(2), args.nlist * 40))
        train_s = time.perf_counter() - start
        result["ivf"] = {"n": args.n, "nlist": args.nlist, "train_s": train_s,
                         "build_s": train_s + fill(ivf, kind, args.n), "sweep": []}
        for nprobe in (1, 4, 16, 64, 256):
            ivf.nprobe = nprobe
            ids, qps = timed_search(ivf, queries, k)
            result["ivf"]["sweep"].append({"nprobe": nprobe, "qps": qps, "recall@10": recall(ids, truth)})
            print(kind, "ivf", result["ivf"]["sweep"][-1], flush=True)
        del ivf
        gc.collect()

        hnsw_n = min(args.hnsw_n, args.n)
        if hnsw_n > 0:  # --hnsw-n 0 skips HNSW (its build dominates at 1M on 2 cores)
            if hnsw_n < args.n:
                truth, result["flat_hnsw_subset"] = exact(kind, hnsw_n, queries, k)
            hnsw = faiss.IndexHNSWFlat(DIM, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = args.ef_construction
            result["hnsw"] = {"n": hnsw_n, "M": args.hnsw_m, "efConstruction": args.ef_construction,
                              "build_s": fill(hnsw, kind, hnsw_n), "sweep": []}
            print(kind, "hnsw build", result["hnsw"]["build_s"], flush=True)
            for ef in (16, 32, 64, 128, 256):
                hnsw.hnsw.efSearch = ef
                ids, qps = timed_search(hnsw, queries, k)
                result["hnsw"]["sweep"].append({"efSearch": ef, "qps": qps, "recall@10": recall(ids, truth)})
                print(kind, "hnsw", result["hnsw"]["sweep"][-1], flush=True)
            del hnsw
            gc.collect()
        out[kind] = result
    return out


def run_embed(args: argparse.Namespace) -> dict:
    """medgem vs transformers SiglipModel on MedSigLIP-448 shapes, random weights, the same pixels and ids."""
    import torch
    import transformers
    from transformers import SiglipConfig
    from transformers import SiglipModel as HFSiglipModel
    from transformers.initialization import no_init_weights

    from medgem.nn.siglip import MEDSIGLIP_448, SiglipModel
    from medgem.weights.siglip import siglip_key

    torch.set_num_threads(args.threads)
    cfg = replace(MEDSIGLIP_448, text=replace(MEDSIGLIP_448.text, num_hidden_layers=args.layers),
                  vision=replace(MEDSIGLIP_448.vision, num_hidden_layers=args.layers))
    text = {k: v for k, v in asdict(cfg.text).items() if k not in ("pad_token_id", "eos_token_id")}
    torch.manual_seed(0)
    with no_init_weights():
        theirs = HFSiglipModel(SiglipConfig(text_config=text, vision_config=asdict(cfg.vision))).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.02)
    ours = SiglipModel(cfg).eval()
    ours.load_state_dict({siglip_key(k): v for k, v in theirs.state_dict().items() if siglip_key(k)})
    pixels = torch.rand(args.images, 3, 448, 448) * 2 - 1
    ids = torch.randint(0, 32_000, (args.texts, 64))
    runners = {
        "images": {"medgem": lambda: ours.embed_images(pixels),
                   "transformers": lambda: theirs.get_image_features(pixel_values=pixels).pooler_output},
        "texts": {"medgem": lambda: ours.embed_texts(ids),
                  "transformers": lambda: theirs.get_text_features(input_ids=ids).pooler_output},
    }
    out: dict = {"layers": args.layers, "threads": args.threads, "batch_images": args.images, "batch_texts": args.texts,
                 "transformers": transformers.__version__, "torch": torch.__version__}
    with torch.inference_mode():
        out["max_abs_diff_image_embeds"] = (
            ours.vision_model(pixels[:1]) - theirs.get_image_features(pixel_values=pixels[:1]).pooler_output
        ).abs().max().item()
        for kind, pair in runners.items():
            times: dict[str, list[float]] = {name: [] for name in pair}
            for _ in range(args.repeats):
                for name, fn in pair.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
                    print(f"{kind} {name}: {times[name][-1]:.2f} s", flush=True)
            count = args.images if kind == "images" else args.texts
            out[kind] = {name: {"per_s": count / statistics.median(t), "seconds_all": t} for name, t in times.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["ann", "embed"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--hnsw-n", type=int, default=1_000_000)
    parser.add_argument("--datasets", default="random,lowrank")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ivf", action="store_true", help="flat and int8 only (no IVF, no HNSW)")
    parser.add_argument("--tag", default="", help="store the result under PART:TAG (keeps earlier runs)")
    args = parser.parse_args()

    result = run_ann(args) if args.part == "ann" else run_embed(args)
    result["command"] = "benchmarks/retrieval.py " + " ".join(
        v if k == "part" else f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items() if v is not False and v != "")
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "python": platform.python_version()}
    everything = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    everything[f"{args.part}:{args.tag}" if args.tag else args.part] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
