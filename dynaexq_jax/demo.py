"""The README's main job on the default model.

No trained model ships yet, so the default model is a small random Qwen3-MoE written in the
Hugging Face format: the demo runs the real path (HF checkpoint -> convert, both expert tiers ->
load -> jitted generation) and says plainly that the text is gibberish."""
from __future__ import annotations

from pathlib import Path

DEFAULT_PROMPTS = ["def fibonacci(n):", "The standard library of Python"]


def run_demo(workdir: Path, prompts=None, **generate_kwargs) -> None:
    import dynaexq_jax
    from checkpoints_convert import convert
    from dynaexq_jax.synthetic import write_random_qwen3_moe

    prompts = prompts or DEFAULT_PROMPTS
    hf_dir, conv_dir = workdir / "hf", workdir / "converted"
    if not (hf_dir / "config.json").exists():
        print(f"[demo] writing a random Qwen3-MoE in the Hugging Face format to {hf_dir} "
              "(default model: random weights until a trained one ships)")
        write_random_qwen3_moe(hf_dir, seed=0)
    if not (conv_dir / "metadata.json").exists():
        print(f"[demo] converting {hf_dir} -> {conv_dir} (HI tier f32, LO tier int4)")
        convert(hf_dir, conv_dir, hi="source", lo="int4", overwrite=True)
    for tier in ("hi", "lo"):
        model = dynaexq_jax.load(conv_dir, tier=tier)
        c = model.config
        print(f"\n[demo] {c.model_type}: {c.num_layers} layers, {c.num_experts} experts top-{c.num_experts_per_tok}; "
              f"all experts in the {tier.upper()} tier ({model.checkpoint.tiers[tier].name})")
        res = model.generate(prompts, **generate_kwargs)
        for p, text in zip(prompts, res.texts):
            print(f"  {p!r} -> {text!r}")
        s = res.stats
        print(f"  time to first token {s.time_to_first_token_s * 1e3:.0f} ms (includes compilation), "
              f"decode {s.decode_tokens_per_s:.1f} tok/s over {s.decode_tokens} tokens")
