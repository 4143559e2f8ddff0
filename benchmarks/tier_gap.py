"""How much each expert format costs the embedded default model: validation perplexity per domain
with every expert in one format (bf16 = the trained weights; int8/int4/int3/int2 group 64, quantized
round-to-nearest (rtn, the method's), by the least-error scale search (mse), by HQQ's solver with
a zero point per group (hqq) or by GPTQ on the calibration split (gptq: --calibration-tokens, half
from each domain): model.quant; and tiers whose down projection has a format of its own,
'int2:g64:hqq+down=int4:g64'), on the first windows of each domain's validation split, with each
format's bits per expert weight (scales and zeros included) and each conversion's time. This is
what chose the model's tier pair.
Writes benchmarks/results/tier_gap.json."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_result  # benchmarks/common.py

import dynaexq_jax
from checkpoints_convert import convert
from dynaexq_jax.experiments import default_model
from dynaexq_jax.experiments.compare import domain_streams
from dynaexq_jax.model.config import parse_hf_config, read_hf_config
from dynaexq_jax.model.quant import expert_nbytes, parse_tier_format
from dynaexq_jax.serving.tokenizer import TextCodec


def perplexity(model, stream: np.ndarray, window: int, windows: int, batch: int = 8) -> float:
    wins = np.stack([stream[i * window:(i + 1) * window + 1] for i in range(windows)])
    nll = []
    for b in range(0, windows, batch):
        logits = model.logits(wins[b:b + batch, :-1])
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll.append(-np.take_along_axis(logp, wins[b:b + batch, 1:, None], -1)[..., 0])
    return float(np.exp(np.concatenate(nll).mean()))


FORMATS = ("bf16", "int8:g64", "int4:g64", "int3:g64", "int2:g64", "int8:g64:mse", "int4:g64:mse", "int3:g64:mse",
           "int2:g64:mse", "int8:g64:hqq", "int4:g64:hqq", "int3:g64:hqq", "int2:g64:hqq",
           # down in a format of its own, and the reverse (gate/up low): where the int2 cost sits
           "int2:g64+down=int4:g64", "int2:g64:mse+down=int4:g64", "int2:g64:hqq+down=int4:g64",
           "int2:g64:hqq+down=int3:g64:hqq", "int2:g64:hqq+down=int8:g64", "int4:g64:hqq+down=int2:g64:hqq",
           "int4:g64:gptq", "int3:g64:gptq", "int2:g64:gptq", "int2:g64:gptq+down=int4:g64:gptq")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=24, help="windows per domain")
    ap.add_argument("--formats", default=",".join(FORMATS), help="expert formats, comma-separated (bf16: trained)")
    ap.add_argument("--calibration-tokens", type=int, default=default_model.CALIBRATION_TOKENS,
                    help="gptq formats: calibration tokens (rows of 512), half from each domain's calibration split")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tier_gap.json"))
    a = ap.parse_args()
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    streams = domain_streams(TextCodec(default_model.HF_DIR), "validation")
    calibration = (default_model.calibration_tokens(a.calibration_tokens)
                   if any(parse_tier_format(f).needs_calibration for f in formats if f != "bf16") else None)
    cfg = parse_hf_config(read_hf_config(default_model.HF_DIR / "config.json"))
    bits = {f: 8 * expert_nbytes(f, cfg.hidden_size, cfg.moe_intermediate_size)
            / (3 * cfg.hidden_size * cfg.moe_intermediate_size) for f in formats}
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # One conversion per pair of formats: its HI tier and its LO tier are two models.
        for i in range(0, len(formats), 2):
            pair = formats[i:i + 2]
            hi, lo = ("source" if pair[0] == "bf16" else pair[0]), pair[-1]
            t0 = time.perf_counter()
            calibrated = any(parse_tier_format(f).needs_calibration for f in (hi, lo) if f != "source")
            conv = convert(default_model.HF_DIR, Path(tmp) / str(i), hi=hi, lo=lo, dtype="f32", progress=False,
                           calibration=calibration if calibrated else None)
            seconds[" + ".join(pair)] = time.perf_counter() - t0
            for tier, fmt in zip(("hi", "lo"), pair):
                model = dynaexq_jax.load(conv, tier=tier)
                rows[fmt] = {d: perplexity(model, s, a.window, a.windows) for d, s in streams.items()}
                gap = "" if "bf16" not in rows else "  (" + ", ".join(
                    f"{d} {100 * (p / rows['bf16'][d] - 1):+.1f}%" for d, p in rows[fmt].items()) + " vs bf16)"
                ppl = ", ".join(f"{d} {p:.3f}" for d, p in rows[fmt].items())
                print(f"{fmt:>27} ({bits[fmt]:.2f} bits/weight): {ppl}{gap}", flush=True)
    print("conversion seconds (both tiers): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    write_result(a.out, benchmark="tier_gap", window=a.window, windows_per_domain=a.windows, perplexity=rows,
                 bits_per_weight=bits, conversion_seconds=seconds,
                 calibration_tokens=None if calibration is None else int(calibration.size))


if __name__ == "__main__":
    main()
