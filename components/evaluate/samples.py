"""Greedy ``generate()`` continuations of prompts cut from the held-out documents."""
from __future__ import annotations

from collections.abc import Sequence


def sample_prompts(docs: Sequence[str], num_samples: int, prompt_words: int) -> list[tuple[str, str]]:
    """``(prompt, reference)`` for the first ``num_samples`` documents: the first ``prompt_words``
    words, and the next ``prompt_words`` words the document actually continues with."""
    out = []
    for doc in docs[:num_samples]:
        words = doc.split()
        out.append((" ".join(words[:prompt_words]), " ".join(words[prompt_words: 2 * prompt_words])))
    return out


def generate_samples(model, tokenizer, docs: Sequence[str], *, num_samples: int = 3, prompt_words: int = 16,
                     max_new_tokens: int = 48) -> list[dict]:
    """``[{"prompt", "continuation", "reference"}]``: greedy decoding (deterministic), one prompt at a time."""
    import torch

    samples = []
    for prompt, reference in sample_prompts(docs, num_samples, prompt_words):
        ids_1T = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out_1S = model.generate(ids_1T, attention_mask=torch.ones_like(ids_1T), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tokenizer.eos_token_id)
        continuation = tokenizer.decode(out_1S[0, ids_1T.shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "continuation": continuation, "reference": reference})
    return samples
