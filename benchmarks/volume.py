"""An 85-slice CT prompt (MedGemma 1.5's ct recipe) end to end on a random-weight model at MedGemma 4B's
shapes (config.MULTIMODAL_PRESETS["4b"]: So400m at 896 px, the 4B decoder), with the time of each stage:

  volume_s    read the series and render the 85 slices (inputs/volume.py)
  process_s   chat template, tokens and pixels (processing/multimodal.py)
  vision_s    the SigLIP tower and projector on every slice (Gemma3Multimodal.encode_images)
  prefill_s   the whole prompt (85 x 256 image tokens + text) through the decoder, images encoded again
              inside it, as the engine does (so prefill_s - vision_s is the decoder's share)
  decode_s    greedy decoding of --new-tokens tokens
  peak_rss_mb the process's peak resident memory

No MedGemma weights download here, so the weights are random (the speed is the shapes' speed, the text
is noise). The series is synthetic: a real CT slice (pydicom's CT_small) at 120 positions.

    python benchmarks/volume.py --slices 85 --dtype bfloat16 --quant int8 --new-tokens 16

Writes benchmarks/results/volume.json. A smoke run of the same path at tiny shapes (a 28 px tower, a
64-wide decoder with Gemma's vocabulary; seconds, not minutes), written to results/volume-tiny.json:

    python benchmarks/volume.py --preset tiny --slices 6 --quant none --new-tokens 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def synthetic_series(folder: Path, count: int) -> None:
    """`count` copies of CT_small.dcm, 2.5 mm apart, 10 HU brighter each."""
    import copy

    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    for k in range(count):
        ds = copy.deepcopy(base)
        ds.PixelData = (base.pixel_array + 10 * k).astype(base.pixel_array.dtype).tobytes()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = uid
        ds.ImagePositionPatient = [float(v) for v in np.array([-158.1, -179.0, -75.7]) + [0, 0, 2.5 * k]]
        ds.save_as(folder / f"IM{k:05d}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=85)
    parser.add_argument("--series-length", type=int, default=120)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quant", default="int8", choices=["none", "int8", "int4"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--preset", default="4b", choices=["4b", "27b", "tiny"],
                        help="model shapes: MULTIMODAL_PRESETS (So400m at 896 px), or tiny for a smoke run")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: results/volume.json, results/volume-<preset>.json for others)")
    args = parser.parse_args()

    import torch

    from medgem import threads
    from medgem.config import MULTIMODAL_PRESETS, MultimodalConfig, tiny_text_config, tiny_vision_config
    from medgem.engine.quant import quantize_text_model
    from medgem.nn.medgemma import Gemma3Multimodal
    from medgem.pipeline import Pipeline
    from medgem.processing.images import ImageProcessor
    from medgem.processing.multimodal import MultimodalProcessor
    from medgem.processing.tokenizer import Tokenizer
    from medgem.weights import embedded_gguf, gguf_reader, medgem_home

    threads.configure(args.threads)
    cfg = MULTIMODAL_PRESETS.get(args.preset) or MultimodalConfig(
        text=tiny_text_config(vocab_size=262_144, max_position_embeddings=8192), vision=tiny_vision_config(),
        mm_tokens_per_image=4)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        torch.set_default_dtype(dtype)  # built in `dtype`: a float32 4B would need 17 GB on the way
        model = Gemma3Multimodal(cfg)
        torch.set_default_dtype(torch.float32)
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.finish_init()
        if args.quant != "none":
            quantize_text_model(model.language_model, args.quant)
    model.eval()
    build_s = time.perf_counter() - start
    tokenizer = Tokenizer.from_gguf(gguf_reader.GGUFIndex.load(embedded_gguf()), medgem_home() / "tokenizers")
    processor = MultimodalProcessor(tokenizer, ImageProcessor(size=cfg.vision.image_size), cfg.mm_tokens_per_image,
                                    cfg.image_token_id)
    pipe = Pipeline(model, tokenizer, cfg.text, f"random {args.preset} shapes", build_s, processor)

    with tempfile.TemporaryDirectory() as tmp:
        synthetic_series(Path(tmp), args.series_length)
        t = time.perf_counter()
        prompt = pipe.recipe_prompt("ct", "Is there a hypodense liver lesion?", source=tmp, max_slices=args.slices,
                                    max_new_tokens=args.new_tokens)
        volume_s = time.perf_counter() - t
    t = time.perf_counter()
    inputs = processor.apply_chat_template(prompt.messages)
    process_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        model.encode_images(inputs.pixel_values.to(dtype))
    vision_s = time.perf_counter() - t
    completion = pipe.complete([prompt.messages], max_new_tokens=args.new_tokens, ignore_eos=True)[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "preset": args.preset,
        "dtype": args.dtype, "quant": args.quant, "slices": prompt.images, "prompt_tokens": completion.prompt_tokens,
        "build_s": round(build_s, 1), "volume_s": round(volume_s, 2), "process_s": round(process_s, 2),
        "vision_s": round(vision_s, 1), "prefill_s": round(completion.prefill_seconds, 1),
        "decode_s": round(completion.decode_seconds, 2), "new_tokens": completion.completion_tokens,
        "decode_tok_s": round(completion.decode_tok_per_s, 2), "peak_rss_mb": round(peak),
    }
    out = args.out or RESULTS / ("volume.json" if args.preset == "4b" else f"volume-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
