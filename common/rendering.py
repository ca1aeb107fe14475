"""Render a trajectory with the STUDENT's chat template into token ids, an assistant loss mask and
the hypernetwork's task prompt.

The mask is 1 exactly on the tokens the assistant wrote: its text, its tool-call text and its
end-of-turn token `<|im_end|>`; 0 on the `<|im_start|>assistant\\n` header (the template writes it,
not the model), on system, user and tool turns, and on the `\\n` the template adds after `<|im_end|>`.
Qwen templates have no generation markers, so assistant spans come from rendering prefixes of the
conversation; a template for which that is unsound is refused (TemplateError), never guessed around.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import DataConfig
from common.errors import UserError
from common.trajectories import Trajectory, repository_of

END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class RenderedSample:
    sample_id: str
    instance_id: str
    input_ids: np.ndarray  # (T,) uint32
    loss_mask: np.ndarray  # (T,) bool, True where the token was written by the assistant
    prompt_ids: np.ndarray  # (P,) uint32, the task prompt for the hypernetwork, P <= max_prompt_tokens
    truncated: bool


class TemplateError(UserError):
    """The chat template cannot give a trustworthy mask (affects every sample: stop the run)."""


class SampleRejected(UserError):
    """This one sample cannot be used; `reason` is the drop reason prepare-data counts."""

    def __init__(self, sample_id: str, reason: str, detail: str):
        super().__init__(f"sample {sample_id}: {detail}")
        self.reason = reason


def _render(tokenizer, messages: list[dict], tools: list[dict], add_generation_prompt: bool, sample_id: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja2 errors, or a template's own raise_exception(...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TemplateError(
            f"sample {sample_id}: chat template failed on the first {len(messages)} messages ({reason})"
        ) from None


def assistant_segments(tokenizer, messages: list[dict], tools: list[dict], sample_id: str) -> list[tuple[str, bool]]:
    """The full render split into (text, written_by_assistant) pieces that concatenate to it.

    For each assistant message i: render(messages[:i], generation prompt) ends just before what the
    model wrote, render(messages[:i+1]) ends just after it (plus the template's trailing newline).
    Each render must be a prefix of the next one and of the full render, else the template is refused.
    """
    full = _render(tokenizer, messages, tools, False, sample_id)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already assigned to segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools, True, sample_id)
        after = _render(tokenizer, messages[: i + 1], tools, False, sample_id)
        if not (len(before) >= done and after.startswith(before) and full.startswith(after)):
            raise TemplateError(f"sample {sample_id}: chat template is not prefix-stable at message {i}")
        written = after[len(before) :]
        end = written.rfind(END_OF_TURN)
        if end < 0:
            raise TemplateError(
                f"sample {sample_id}: chat template wrote no {END_OF_TURN} after assistant message {i}"
            )
        end += len(END_OF_TURN)
        segments += [(before[done:], False), (written[:end], True), (written[end:], False)]
        done = len(after)
    segments.append((full[done:], False))
    return [(text, mask) for text, mask in segments if text]


def tokenize_with_mask(
    tokenizer, messages: list[dict], tools: list[dict], sample_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids uint32 (T,), loss_mask bool (T,)) of the full render.

    Segments are tokenised separately and concatenated, so every segment boundary is a token
    boundary. That is deliberate: at generation time the model's tokens start right after the
    `<|im_start|>assistant\\n` header, so the assistant's text must be tokenised on its own, exactly
    as it was generated; tokenising the whole string could merge the header's newline with the
    assistant's leading whitespace into one token that neither side wrote alone.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for text, written in assistant_segments(tokenizer, messages, tools, sample_id):
        # add_special_tokens=False: no BOS/EOS of the tokenizer's own; '<|im_end|>' etc. in the text
        # are still recognised as the special tokens they are.
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [written] * len(piece)
    return np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=bool)


def task_prompt(traj: Trajectory, data_cfg: DataConfig) -> str:
    """The text the hypernetwork reads (data.prompt): the first user message, optionally after the system turn;
    or `repository`: "Repository: owner/name" alone, from the instance id, for runs where the behaviour to learn
    is the repository's and the issue text would only add noise to the task vector."""
    if data_cfg.prompt == "repository":
        repo = repository_of(traj.instance_id)
        if repo is None:
            raise SampleRejected(
                traj.id, "no_repository",
                f"data.prompt=repository: instance id {traj.instance_id!r} is not of the form owner__name-NUMBER",
            )  # fmt: skip
        return f"Repository: {repo}"
    user = next((m["content"] for m in traj.messages if m["role"] == "user"), None)
    if user is None:
        raise SampleRejected(traj.id, "no_user_message", "trajectory has no user message")
    if data_cfg.prompt == "system_and_first_user":
        system = next((m["content"] for m in traj.messages if m["role"] == "system"), "")
        return f"{system}\n\n{user}" if system else user
    return user


def render_trajectory(traj: Trajectory, tokenizer, data_cfg: DataConfig) -> RenderedSample:
    """Render one trajectory; SampleRejected (with .reason) when it cannot be used as configured."""
    prompt = task_prompt(traj, data_cfg)
    if not any(m["role"] == "assistant" for m in traj.messages):
        raise SampleRejected(traj.id, "no_assistant_message", "trajectory has no assistant message")
    input_ids, loss_mask = tokenize_with_mask(tokenizer, traj.messages, traj.tools, traj.id)
    n = len(input_ids)
    truncated = False
    if n > data_cfg.max_tokens:
        if data_cfg.overlong == "skip":
            raise SampleRejected(traj.id, "too_long", f"{n} tokens > data.max_tokens={data_cfg.max_tokens}")
        input_ids, loss_mask, truncated = input_ids[: data_cfg.max_tokens], loss_mask[: data_cfg.max_tokens], True
        if not loss_mask.any():
            raise SampleRejected(
                traj.id, "no_assistant_tokens", f"no assistant token in the first {data_cfg.max_tokens} tokens"
            )
    if len(input_ids) < data_cfg.min_tokens:
        raise SampleRejected(traj.id, "too_short", f"{len(input_ids)} tokens < data.min_tokens={data_cfg.min_tokens}")
    prompt_ids = tokenize_prompt(tokenizer, prompt, data_cfg.max_prompt_tokens)
    return RenderedSample(
        sample_id=traj.id,
        instance_id=traj.instance_id,
        input_ids=input_ids,
        loss_mask=loss_mask,
        prompt_ids=prompt_ids,
        truncated=truncated,
    )


def tokenize_prompt(tokenizer, text: str, max_tokens: int) -> np.ndarray:
    """The task prompt as the hypernetwork reads it: plain tokens (no template), cut to max_tokens.
    Training (via the cache) and `export-lora` both tokenise prompts here, so they cannot drift apart."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return np.asarray(ids, dtype=np.uint32)
