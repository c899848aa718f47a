"""GPU benchmark: LoRA step FLOP efficiency, evaluation throughput, FedCoLLM's server-step memory.

Every figure is measured in this run, on this GPU, with randomly initialised models built from
configs (real weights cannot travel to a bare GPU machine):

1. The bfloat16 matrix-multiply peak (an 8192^3 product, the best of several).
2. A LoRA training step (forward + backward, loss on every token, r=16 on every projection) of
   a 1B-parameter Llama (TinyLlama's shape) and of GPT-2 Large, batch 8 x 512: its FLOPs as
   torch's `FlopCounterMode` counts them, its time, and the achieved fraction of the peak
   (target >= 40 %).
3. Evaluation questions per second: `fedcollm.evaluation.multiple_choice.evaluate` on 256
   four-choice questions with the 1B Llama.
4. FedCoLLM's server step (`distill_losses` + backward: LLM and SLM forward and backward on one
   batch of 8 x 512) with a LLaMa2-7B-shape LLM stored in 4-bit NF4 and a 1.3B SLM
   (Sheared-LLaMA's shape) in bfloat16: the peak GPU memory (target < 16 GB).

    python bench/bench_gpu.py                 # on a CUDA machine (scripts/gpu_check.sh runs it)
    python bench/bench_gpu.py --device cpu --tiny    # the same code on small shapes, anywhere

Prints a JSON report and a markdown table, and writes both to bench/out/gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from fedcollm.config import DistillConfig, LoraConfig
from fedcollm.lm.encoding import Encoded, collate
from fedcollm.lm.lora import attach_lora

OUT = Path(__file__).resolve().parent / "out"
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
LLAMA_1_3B = {
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "vocab_size": 32000,
}
GPT2_LARGE = {"n_embd": 1280, "n_layer": 36, "n_head": 20, "vocab_size": 50257, "n_positions": 1024}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
}
LORA_ALL = LoraConfig(r=16, alpha=32, dropout=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    """Best bfloat16 matmul throughput over `repeats` products of two size x size matrices."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def build(kind: str, shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A randomly initialised causal LM of `shape`, created directly on `device`."""
    config = GPT2Config(**shape) if kind == "gpt2" else LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model


def lora_targets(kind: str) -> LoraConfig:
    modules = (
        ["c_attn", "c_proj", "c_fc"]
        if kind == "gpt2"
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    return LORA_ALL.model_copy(update={"target_modules": modules})


def random_batch(vocab: int, batch: int, length: int, device: torch.device) -> Any:
    """A batch of random token sequences whose every position but the first is a target."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randint(0, vocab, (batch, length), generator=generator, device="cpu").tolist()
    return collate([Encoded(tuple(r), 1) for r in rows], 0, device=device)


def training_step(model: Any, batch: Any) -> None:
    from fedcollm.lm.logits import answer_cross_entropy, target_logits

    answer_cross_entropy(target_logits(model, batch), batch).backward()


def step_efficiency(
    kind: str, shape: dict[str, Any], device: torch.device, batch: int, length: int, peak: float, repeats: int
) -> dict[str, Any]:
    """FLOP/s of a LoRA training step as a fraction of the matmul peak."""
    model = attach_lora(build(kind, shape, device, torch.bfloat16), lora_targets(kind), seed=0)
    model.train()
    data = random_batch(shape["vocab_size"], batch, length, device)
    with FlopCounterMode(display=False) as counter:
        training_step(model, data)
    flops = counter.get_total_flops()
    for _ in range(2):
        training_step(model, data)
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        training_step(model, data)
        sync(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {
        "params": params,
        "tokens": batch * length,
        "flops": flops,
        "seconds": best,
        "flops_per_s": flops / best,
        "fraction_of_peak": flops / best / peak,
    }


def eval_throughput(shape: dict[str, Any], device: torch.device, questions: int) -> dict[str, Any]:
    """Questions per second of the multiple-choice evaluator on random four-choice questions."""
    from fedcollm.evaluation.multiple_choice import sequence_loglikelihoods

    model = build("llama", shape, device, torch.bfloat16)
    generator = torch.Generator(device="cpu").manual_seed(1)
    vocab = shape["vocab_size"]

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab, (n,), generator=generator, device="cpu").tolist())

    sequences = []
    for _ in range(questions):
        context = ids(96)
        sequences += [Encoded(context + ids(8), len(context)) for _ in range(4)]
    sequence_loglikelihoods(model, sequences, 0, 32)  # warm-up on the same shapes
    sync(device)
    start = time.perf_counter()
    sequence_loglikelihoods(model, sequences, 0, 32)
    sync(device)
    seconds = time.perf_counter() - start
    del model
    return {"questions": questions, "seconds": seconds, "questions_per_s": questions / seconds}


def quantise_4bit(model: Any, device: torch.device) -> Any:
    """Every decoder linear layer of `model` (not the head) replaced by bitsandbytes' NF4 layer."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data.to("cpu"),
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                setattr(module, child_name, layer.to(device))
                del child
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def server_step_memory(
    device: torch.device,
    llm_shape: dict[str, Any],
    slm_shape: dict[str, Any],
    batch: int,
    length: int,
    quantise: bool,
) -> dict[str, Any]:
    """Peak memory of one FedCoLLM server step with a 4-bit LLM and a bfloat16 SLM."""
    from fedcollm.algorithms.fedcollm.distillation import distill_losses

    llm = build("llama", llm_shape, device, torch.bfloat16)
    if quantise:
        llm = quantise_4bit(llm, device)
    lora = LoraConfig(r=16, alpha=32, dropout=0.0)
    llm, slm = (
        attach_lora(llm, lora, seed=0),
        attach_lora(build("llama", slm_shape, device, torch.bfloat16), lora, 1),
    )
    generator = torch.Generator(device="cpu").manual_seed(2)
    rows = torch.randint(
        3, llm_shape["vocab_size"], (batch, length), generator=generator, device="cpu"
    ).tolist()
    items = [Encoded(tuple(r), length - 16) for r in rows]  # 16 answer tokens per sequence
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    loss_f, loss_g, _, _ = distill_losses(
        llm, slm, items, items, llm_pad_id=0, slm_pad_id=0, cfg=DistillConfig()
    )
    (loss_f + loss_g).backward()
    sync(device)
    report: dict[str, Any] = {
        "llm_4bit": quantise,
        "batch": batch,
        "length": length,
        "loss": float(loss_f.detach() + loss_g.detach()),
    }
    if device.type == "cuda":
        report["resident_gib"] = resident / 2**30
        report["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del llm, slm
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a check of the code, not figures)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": tiny,
    }
    peak = matmul_peak(device, 512 if tiny else 8192, repeats=3 if tiny else 10)
    report["bf16_matmul_peak_tflops"] = peak / 1e12
    batch, length = (2, 32) if tiny else (8, 512)
    repeats = 2 if tiny else 5
    report["lora_step_llama_1b"] = step_efficiency(
        "llama", TINY if tiny else LLAMA_1B, device, batch, length, peak, repeats
    )
    gpt2 = (
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 128}
        if tiny
        else GPT2_LARGE
    )
    report["lora_step_gpt2_large"] = step_efficiency("gpt2", gpt2, device, batch, length, peak, repeats)
    report["eval_llama_1b"] = eval_throughput(TINY if tiny else LLAMA_1B, device, 16 if tiny else 256)
    report["server_step_7b_4bit"] = server_step_memory(
        device,
        TINY if tiny else LLAMA_7B,
        TINY if tiny else LLAMA_1_3B,
        batch,
        length,
        quantise=True,
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (OUT / "gpu.md").write_text(table)
    print(json.dumps(report, indent=2))
    print(table)


def markdown(report: dict[str, Any]) -> str:
    """The report as the table bench/README.md records."""
    lines = [
        f"{report['date']}, {report['device']}, torch {report['torch']} (CUDA {report['cuda']})",
        "",
        "| figure | measured | target |",
        "| --- | --- | --- |",
        f"| bf16 matmul peak (8192^3) | {report['bf16_matmul_peak_tflops']:.0f} TFLOP/s | - |",
    ]
    for key, label in (
        ("lora_step_llama_1b", "LoRA step, 1B Llama"),
        ("lora_step_gpt2_large", "LoRA step, GPT-2 Large"),
    ):
        step = report[key]
        lines.append(
            f"| {label}, {step['tokens']} tokens | {step['fraction_of_peak']:.1%} of peak "
            f"({step['flops_per_s'] / 1e12:.0f} TFLOP/s, {step['seconds'] * 1e3:.0f} ms) | >= 40% |"
        )
    ev = report["eval_llama_1b"]
    lines.append(f"| evaluation, 1B Llama, 4 choices | {ev['questions_per_s']:.0f} questions/s | - |")
    mem = report["server_step_7b_4bit"]
    if "peak_gib" in mem:
        lines.append(
            f"| FedCoLLM server step, 7B NF4 LLM + 1.3B SLM, {mem['batch']}x{mem['length']} | "
            f"{mem['peak_gib']:.1f} GiB peak ({mem['resident_gib']:.1f} GiB resident) | < 16 GB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
