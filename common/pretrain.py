"""A short, offline pretraining that turns a randomly initialised tiny model into a weak code model.

Why: a random model's next-token distribution is near-uniform over 151,936 ids, so a teacher cache of it
is noise and distillation from it means nothing. A few minutes of CPU training on Python source gives the
tiny teacher peaked, code-like distributions; the tiny student gets the same recipe with fewer steps (a
prefix of the same data), so it is a real but weaker model that distillation can still improve.

Corpus (no download): the Python standard library's own sources (top-level `*.py` files of
`sysconfig.get_paths()['stdlib']`, a fixed set of modules held out for evaluation) plus the bundled sample
trajectories rendered with the chat template, so the models see the special tokens and the tool-call
format too. The corpus depends on the local Python's stdlib; builds are deterministic for a given Python,
torch and core count.

Cost: the output layer is trained over the ids that occur in the corpus only (see `pretrain`), which makes
the teacher's 100 steps take about a minute on 2 cores instead of several.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

# Held out of training, used to measure quality (mid-sized, ordinary library code).
HELDOUT_MODULES = ("textwrap.py", "shlex.py", "graphlib.py", "fnmatch.py")
# Only the head of each training file is used, so that a fixed token budget spans many modules.
MAX_CHARS_PER_FILE = 12_000


@dataclass(frozen=True)
class PretrainRecipe:
    """How long and how hard one tiny model is trained; part of the model's identity (see RECIPE_VERSION)."""

    steps: int
    """Optimizer steps; each consumes `batch_size` fresh rows of the stream (one pass, no repeats)."""
    batch_size: int = 8
    """Rows per step."""
    seq_len: int = 256
    """Tokens per row (the row holds seq_len + 1 tokens: inputs and shifted targets)."""
    lr: float = 1e-3
    """Peak AdamW learning rate of the transformer body (attention, MoE, norms)."""
    table_lr: float = 3e-2
    """Peak learning rate of the embedding and lm_head rows. Each row is updated only on the steps where
    its token occurs; with the body's rate for everything, the layers drowned the token's identity in a
    context average long before the rows moved (measured on the teacher after 40 steps: held-out top-1
    2% with one rate for all, 12% with this split)."""
    offset_lr: float = 3e-2
    """Peak learning rate of the unseen-id offset d (see `pretrain`)."""
    embed_std: float = 0.3
    """The embedding table is rescaled to this std before training (from the config's 0.02), for the same
    reason as table_lr: the token's own vector must not start far below the layers' outputs."""
    warmup_steps: int = 10
    """Linear warm-up, then cosine decay to 10% of the peak."""
    seed: int = 0
    """Seeds the constant embedding direction here; the caller seeds the model's initialisation with it."""

    @property
    def n_rows(self) -> int:
        return self.steps * self.batch_size


def _stable_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): top-level stdlib modules, training ones in a stable shuffled order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    heldout = [f for f in files if f.name in HELDOUT_MODULES]
    train = sorted((f for f in files if f.name not in HELDOUT_MODULES), key=lambda f: _stable_key(f.name))
    return train, heldout


def heldout_code_texts() -> list[str]:
    """Source texts of the held-out stdlib modules: never trained on, used to measure quality."""
    return [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[1]]


def training_documents(trajectory_texts: list[str]) -> list[str]:
    """Trajectory renders and stdlib file heads, interleaved in a stable order (a hash of the text)."""
    train_files, _ = stdlib_files()
    code = [f.read_text(encoding="utf-8", errors="replace")[:MAX_CHARS_PER_FILE] for f in train_files]
    return sorted(code + list(trajectory_texts), key=_stable_key)


def token_stream(tokenizer, documents: list[str], n_tokens: int) -> torch.Tensor:
    """The first `n_tokens` tokens of the documents joined by <|endoftext|> (int64 [n_tokens]).

    Raises ValueError if the documents hold fewer tokens than asked: a recipe must not silently train on
    less data than it says.
    """
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eot)
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.int64)
    raise ValueError(f"pretraining corpus holds {len(ids)} tokens, the recipe needs {n_tokens}")


def stream_rows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a stream into rows of seq_len + 1 tokens overlapping by one, so every token is a target once.

    [N] -> [(N - 1) // seq_len, seq_len + 1]
    """
    n_rows = (stream.numel() - 1) // seq_len
    return stream[: n_rows * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def _lr_scale(step: int, recipe: PretrainRecipe) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(model, rows: torch.Tensor, recipe: PretrainRecipe, desc: str = "pretrain") -> tuple[dict, torch.Tensor]:
    """Train `model` in place on `rows` ([n_rows, seq_len + 1] token ids) with a vocabulary-subset softmax.

    Returns (a small report: losses, tokens, speed; the sorted ids that occur in the trained rows).

    Why a subset: the full output layer is [151,936 x hidden]; its logits, log-softmax and gradients would
    cost most of a step, and dense Adam updates of both vocabulary tables would touch 2 x 151,936 rows per
    step, although the corpus uses only some ten thousand ids. So the embedding and lm_head rows of the ids
    that occur in `rows` ("seen") are copied into small trainable tables, trained, and written back.

    The unseen ids keep their small random rows, so their logits w_u . h are near 0, and training counts
    them as ONE bucket in the softmax normaliser: log(n_unseen) + d . h, i.e. the full-vocabulary softmax
    with every unseen logit taken as d . h, where d is a single learned vector added to all unseen lm_head
    rows at the end (exactly, so the saved model computes what was trained). Without the bucket, the subset
    softmax is blind to the ~140k unseen ids and they would hold most of the probability of the full model;
    with it, the model learns that ids it never saw are unlikely (`unseen_mass` in the quality report).
    Learning that offset needs a direction of the final hidden state that is the same at every position:
    a constant vector c (the norm of one random row) is added to every embedding row at the start. It acts
    like the bias dimension trained LMs grow by themselves, and lm_head rows read it as a per-token bias.
    (Measured on the teacher, 40 steps: without c and d the unseen ids held 36-70% of the probability.)
    """
    if rows.shape[0] < recipe.n_rows or rows.shape[1] != recipe.seq_len + 1:
        raise ValueError(f"need {recipe.n_rows} rows of {recipe.seq_len + 1} tokens, got {tuple(rows.shape)}")
    rows = rows[: recipe.n_rows]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab, hidden_size = head.weight.shape
    seen = torch.unique(rows)  # [V'] sorted full-vocabulary ids
    unseen = torch.ones(vocab, dtype=torch.bool)
    unseen[seen] = False
    to_compact = torch.full((vocab,), -1, dtype=torch.int64)
    to_compact[seen] = torch.arange(seen.numel())
    compact_rows = to_compact[rows]
    log_unseen = math.log(int(unseen.sum()))

    with torch.no_grad():
        generator = torch.Generator().manual_seed(recipe.seed)
        direction = torch.randn(hidden_size, generator=generator)
        embed.weight *= recipe.embed_std / embed.weight.std()
        embed.weight += direction / direction.norm() * recipe.embed_std * math.sqrt(hidden_size)
    sub_embed = torch.nn.Parameter(embed.weight.detach()[seen].clone())  # [V', H]
    sub_head = torch.nn.Parameter(head.weight.detach()[seen].clone())  # [V', H]
    unseen_offset = torch.nn.Parameter(torch.zeros(hidden_size))  # d: [H]
    embed.weight.requires_grad_(False)
    head.weight.requires_grad_(False)
    body = [p for p in model.parameters() if p.requires_grad]
    params = body + [sub_embed, sub_head, unseen_offset]
    groups = [
        {"params": body, "peak_lr": recipe.lr},
        {"params": [sub_embed, sub_head], "peak_lr": recipe.table_lr},
        {"params": [unseen_offset], "peak_lr": recipe.offset_lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)

    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        batch = compact_rows[step * recipe.batch_size : (step + 1) * recipe.batch_size]  # [B, T+1]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = model.model(inputs_embeds=F.embedding(inputs, sub_embed)).last_hidden_state  # [B, T, H]
        logits = (hidden @ sub_head.T).float()  # [B, T, V']
        bucket = log_unseen + (hidden @ unseen_offset).float()  # [B, T]
        normaliser = torch.logaddexp(torch.logsumexp(logits, dim=-1), bucket)  # [B, T]
        loss = (normaliser - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * _lr_scale(step, recipe)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    bar.close()

    with torch.no_grad():
        embed.weight[seen] = sub_embed
        head.weight[seen] = sub_head
        head.weight[unseen] += unseen_offset
    embed.weight.requires_grad_(True)
    head.weight.requires_grad_(True)
    model.eval()
    tail = losses[-max(1, recipe.steps // 10) :]
    report = {
        "steps": recipe.steps,
        "train_tokens": recipe.n_rows * recipe.seq_len,
        "seen_ids": seen.numel(),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "seconds": round(seconds, 1),
        "tokens_per_s": round(recipe.n_rows * recipe.seq_len / seconds),
    }
    return report, seen


@torch.no_grad()
def next_token_quality(model, rows: torch.Tensor, seen_ids: torch.Tensor | None = None) -> dict:
    """Mean entropy (nats), top-1 accuracy and NLL of the full-vocabulary next-token distribution.

    rows: [N, T+1] token ids; one row at a time so that only a [T, vocab] fp32 tensor exists.
    seen_ids: if given, also the mean probability mass on ids outside it (`unseen_mass`).
    """
    model.eval()
    entropy = correct = nll = unseen = 0.0
    count = 0
    for row in rows:
        logits = model(input_ids=row[None, :-1]).logits[0].float()  # [T, V]
        logp = torch.log_softmax(logits, dim=-1)
        target = row[1:]
        entropy += -(logp.exp() * logp).sum().item()
        correct += (logits.argmax(-1) == target).sum().item()
        nll += -logp.gather(-1, target[:, None]).sum().item()
        if seen_ids is not None:
            unseen += (1 - logp[:, seen_ids].exp().sum(-1)).sum().item()
        count += target.numel()
    report = {"entropy": entropy / count, "top1": correct / count, "nll": nll / count}
    if seen_ids is not None:
        report["unseen_mass"] = unseen / count
    return {k: round(v, 4) for k, v in report.items()}
