"""``ragraph reranker adapt``: build a cross-encoder with no pretrained reranker and no labels.

The packaged MiniLM bi-encoder's transformer gets a fresh one-logit head and is trained on pairs
mined from the corpus itself (no evaluation labels are read):

- query: one sentence of a sampled chunk (6-30 words);
- positive: that chunk with the sentence taken out (the rest of its passage);
- negatives: hybrid-retrieval hits for the sentence from other documents, taken from ranks
  ``neg_from``.. so that near-duplicates at the very top are less likely to be false negatives.

Training stops at ``max_minutes`` whatever the epoch; the folder it writes loads with
``sentence_transformers.CrossEncoder``.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SENT = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True, slots=True)
class Pair:
    query: str
    passage: str
    label: float


def mine_pairs(
    retriever, *, n_queries: int, negatives: int = 3, neg_from: int = 4, seed: int = 0, log: Callable[[str], None] = print
) -> list[Pair]:
    idx = retriever.index
    rng = random.Random(seed)
    rows = list(range(len(idx)))
    rng.shuffle(rows)
    pairs: list[Pair] = []
    used = 0
    t0 = time.perf_counter()
    for r in rows:
        if used >= n_queries:
            break
        c = idx.chunk(r)
        sents = [s for s in _SENT.split(c.text) if 6 <= len(s.split()) <= 30]
        if not sents:
            continue
        q = rng.choice(sents)
        rest = c.text.replace(q, " ").strip()
        if len(rest.split()) < 8:
            continue
        hits = [p for p in retriever.run(query=q, top_k=neg_from + 4 * negatives) if p.document_id != c.document_id]
        pool = hits[neg_from:]
        if len(pool) < negatives:
            continue
        pairs.append(Pair(q, "\n".join(x for x in (c.title, c.heading_path, rest) if x), 1.0))
        for p in rng.sample(pool, negatives):
            pairs.append(Pair(q, "\n".join(x for x in (p.title, p.heading_path, p.text) if x), 0.0))
        used += 1
        if used % 200 == 0:
            log(f"  mined {used}/{n_queries} pseudo-queries ({time.perf_counter() - t0:.0f} s)")
    rng.shuffle(pairs)
    return pairs


def train_cross_encoder(
    base_model: str,
    pairs: list[Pair],
    out: Path,
    *,
    max_minutes: float,
    batch_size: int = 16,
    lr: float = 3e-5,
    max_length: int = 192,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    import torch
    from sentence_transformers import CrossEncoder

    if not pairs:
        raise ValueError("no training pairs were mined; the corpus is too small or has no sentences of 6-30 words")
    ce = CrossEncoder(base_model, num_labels=1, max_length=max_length, device="cpu")
    model, tok = ce.model, ce.tokenizer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = (len(pairs) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0, deadline = time.perf_counter(), time.perf_counter() + max_minutes * 60
    done, running = 0, 0.0
    for step in range(steps):
        if time.perf_counter() > deadline:
            log(f"  time budget of {max_minutes} min reached after {step}/{steps} steps")
            break
        batch = pairs[step * batch_size : (step + 1) * batch_size]
        enc = tok([p.query for p in batch], [p.passage for p in batch], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        logits = model(**enc).logits.view(-1)
        loss = loss_fn(logits, torch.tensor([p.label for p in batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        done += len(batch)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0:
            log(f"  step {step}/{steps}  loss {running:.3f}  ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    ce.save(str(out))
    return {"pairs_seen": done, "seconds": time.perf_counter() - t0, "final_loss": running}
