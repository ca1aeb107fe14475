"""A task-family testbed: 30 small repositories whose right agent behaviour differs by task, on CPU in minutes.

Each task is a repository `ORG/KIND-WORD`. Two conventions decide what the agent must type, and the task prompt
reveals them only through the repository's name (never spelled out):
- the organisation fixes the test command (`ORGS`: acme runs `pytest -q`, globex `python -m unittest -v`, ...);
- the project kind fixes which of the five shell tools the agent calls and the source folder it works in
  (`KINDS`: cli projects use `run_shell` on `cli_app/`, web projects `terminal` on `webapp/`, ...).
Every task offers the same tools, so nothing else in the context names the right one. 6 organisations x 5 kinds
= 30 tasks; the 6 on one diagonal of the org x kind grid are UNSEEN: no stage-2 training trajectory of theirs
exists, although each of their organisations and kinds occurs in at least 4 seen tasks (a systematic-generalisation
split).

Trajectories (OpenAI-style rows, the layout of nebius/SWE-rebench-openhands-trajectories): the issue names a
function in a file; the agent lists the source folder, reads the file, edits it, runs the tests and reports, in
about 300 tokens. Everything random (file, function, issue wording) comes from a seeded generator per split:
- `teacher`: 16 trajectories of every task (all 30): what the testbed's tiny teacher is trained on;
- `seen`:    8 other trajectories of each of the 24 seen tasks: stage 2's data (its held-out fraction gives
             unseen trajectories of seen tasks);
- `unseen`:  8 trajectories of each of the 6 unseen tasks: held out of stage 2 entirely;
- `student`: 16 trajectories of every task whose shell tool, source folder and test command are each drawn at
             random from the five / five / six the testbed uses, whatever the repository: what the testbed's tiny
             student is trained on, so that it knows the agent format and every convention but not which task
             uses which.
`data.source: testbed:seen` (or `testbed:unseen`) reads them; the files are written once under
$HYPERDISTILL_HOME/testbed/ (or the repository's .cache/hyperdistill/testbed/), like the tiny models.

The teacher (`tiny-teacher-testbed`, common.tiny_models) is the demo's tiny-teacher shape trained on the teacher
split, in rows long enough to hold a whole trajectory, so it has learned both conventions (`convention_accuracy`).
The student (`tiny-student-testbed`) is the demo's tiny-student shape trained the same way on the student split:
it writes the format as the teacher does and is at chance on the conventions (its build report), so what is left
to distil is mostly the task-dependent part, as for a real student that is already a capable agent. (The demo's
tiny-student has never seen a testbed trajectory: against this teacher its KL is dominated by the shared format,
which any LoRA learns first.)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

ORGS = {
    "acme": "pytest -q",
    "globex": "python -m unittest -v",
    "initech": "tox -e py311",
    "umbrella": "make check",
    "hooli": "nox -s tests",
    "vandelay": "hatch run test",
}
"""organisation -> its test command"""

KINDS = {
    "cli": ("run_shell", "cli_app"),
    "web": ("terminal", "webapp"),
    "data": ("bash", "pipelines"),
    "ml": ("exec_cmd", "models"),
    "infra": ("posix_sh", "deploy"),
}
"""project kind -> (the shell tool its agents call, its source folder)"""

WORDS = ("lark", "fjord", "quill", "ember", "tundra", "basalt")
"""A task's repository is ORG/KIND-WORD, WORD = WORDS[org index]: names are unique and carry no convention."""

SPLITS = ("teacher", "seen", "unseen", "student")
PER_TASK = {"teacher": 16, "seen": 8, "unseen": 8, "student": 16}
SEEDS = {"teacher": 101, "seen": 202, "unseen": 303, "student": 404}
VERSION = "1"
"""Bump when the generator changes: cached files with another version are rewritten."""

SYSTEM = (
    "You are a software engineering agent working in a repository checkout. Use the shell tool and the "
    "source folder that this project type uses, and the organisation's own test command."
)
EDITOR = "str_replace_editor"
_FILES = ("parser", "config", "cache", "router", "report", "loader", "schema", "client", "queue", "utils")
_VERBS = ("parse", "load", "render", "merge", "split", "format", "resolve", "validate", "encode", "flush")
_NOUNS = ("header", "record", "path", "token", "entry", "value", "batch", "column", "option", "chunk")
_BUGS = (
    ("returns None for an empty {n}", "if not {n}:\n        return None", "if not {n}:\n        return []"),
    ("crashes on a trailing comma in the {n}", "items = {n}.split(',')", "items = [x for x in {n}.split(',') if x]"),
    ("ignores upper-case {n} names", "key = {n}", "key = {n}.lower()"),
    ("keeps surrounding spaces in the {n}", "return {n}", "return {n}.strip()"),
)


@dataclass(frozen=True)
class Task:
    org: str
    kind: str

    @property
    def repo(self) -> str:
        return f"{self.org}/{self.kind}-{WORDS[list(ORGS).index(self.org)]}"

    @property
    def test_command(self) -> str:
        return ORGS[self.org]

    @property
    def shell_tool(self) -> str:
        return KINDS[self.kind][0]

    @property
    def source_dir(self) -> str:
        return KINDS[self.kind][1]

    @property
    def unseen(self) -> bool:
        """One (wrapped) diagonal of the grid: every organisation keeps 4 seen tasks, every kind at least 4."""
        return list(ORGS).index(self.org) % len(KINDS) == list(KINDS).index(self.kind)


TASKS = tuple(Task(org, kind) for org in ORGS for kind in KINDS)


def tasks_of(split: str) -> list[Task]:
    if split in ("teacher", "student"):
        return list(TASKS)
    return [t for t in TASKS if t.unseen == (split == "unseen")]


def _tools() -> list[dict]:
    shell = [
        {"type": "function", "function": {
            "name": name, "description": "Run a shell command in the checkout.",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        }}
        for name in sorted(tool for tool, _ in KINDS.values())
    ]  # fmt: skip
    editor = {"type": "function", "function": {
        "name": EDITOR, "description": "Replace old_str by new_str in a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "old_str": {"type": "string"},
                                                        "new_str": {"type": "string"}},
                       "required": ["path", "old_str", "new_str"]},
    }}  # fmt: skip
    return [*shell, editor]


def _call(rng: random.Random, name: str, arguments: dict) -> dict:
    return {"id": f"call_{rng.getrandbits(48):012x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}  # fmt: skip


def trajectory(task: Task, rng: random.Random, number: int, scrambled: bool = False) -> dict:
    """One resolved trajectory of `task` (an OpenAI-style row); `scrambled`: with a shell tool, source folder and
    test command each drawn at random instead of the task's own (the student split)."""
    shell, source_dir, tests = task.shell_tool, task.source_dir, task.test_command
    if scrambled:
        tools, folders = zip(*KINDS.values())
        shell, source_dir, tests = rng.choice(tools), rng.choice(folders), rng.choice(list(ORGS.values()))
    module, other = rng.sample(_FILES, 2)
    noun = rng.choice(_NOUNS)
    func = f"{rng.choice(_VERBS)}_{noun}"
    bug, old, new = rng.choice(_BUGS)
    old, new = old.format(n=noun), new.format(n=noun)
    path = f"{source_dir}/{module}.py"
    source = f"def {func}({noun}):\n    {old}\n    return {noun}\n"
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Repository: {task.repo}\nIssue #{number}: `{func}` {bug.format(n=noun)}."},
        {"role": "assistant", "content": "Let me look at the source folder.",
         "tool_calls": [_call(rng, shell, {"command": f"ls {source_dir}"})]},
        {"role": "tool", "content": f"__init__.py\n{min(module, other)}.py\n{max(module, other)}.py"},
        {"role": "assistant", "content": f"`{func}` should be in {path}.",
         "tool_calls": [_call(rng, shell, {"command": f"cat {path}"})]},
        {"role": "tool", "content": source},
        {"role": "assistant", "content": f"The fix is in `{func}`.",
         "tool_calls": [_call(rng, EDITOR, {"path": path, "old_str": old, "new_str": new})]},
        {"role": "tool", "content": f"Edited {path}."},
        {"role": "assistant", "content": "Now the tests.", "tool_calls": [_call(rng, shell, {"command": tests})]},
        {"role": "tool", "content": f"{rng.randint(3, 40)} passed"},
        {"role": "assistant", "content": f"Fixed `{func}` in {path}; `{tests}` passes."},
    ]  # fmt: skip
    for m in messages:  # the tool messages name their call, as published rows do
        if m["role"] == "assistant" and "tool_calls" in m:
            last = m["tool_calls"][0]
        elif m["role"] == "tool":
            m["tool_call_id"], m["name"] = last["id"], last["function"]["name"]
    instance = f"{task.repo.replace('/', '__')}-{number}"
    return {"trajectory_id": f"tb-{instance}", "instance_id": instance, "repo": task.repo, "trajectory": messages,
            "tools": _tools(), "resolved": True}  # fmt: skip


def generate(split: str) -> list[dict]:
    """Every row of one split, in a fixed order (seeded: the same on every machine)."""
    if split not in SPLITS:
        raise ValueError(f"testbed split {split!r}: expected one of {SPLITS}")
    rng = random.Random(SEEDS[split])
    base = {"teacher": 1000, "seen": 2000, "unseen": 3000, "student": 4000}[split]  # numbers never repeat across splits
    scrambled = split == "student"
    return [trajectory(t, rng, base + i, scrambled) for t in tasks_of(split) for i in range(PER_TASK[split])]


def testbed_home() -> Path:
    root = os.environ.get("HYPERDISTILL_HOME")
    base = Path(root) if root else Path(__file__).resolve().parent.parent / ".cache" / "hyperdistill"
    return base / "testbed"


def split_file(split: str) -> Path:
    """The split's JSONL file, written (atomically) on first use."""
    path = testbed_home() / f"v{VERSION}" / f"{split}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in generate(split)), encoding="utf-8")
        os.replace(tmp, path)
    return path


def convention_spans(text: str, task: Task) -> dict[str, list[tuple[int, int]]]:
    """Character spans, in a rendered trajectory, of what the task's conventions decide: the shell tool's name in
    each call, the source folder in the `ls` call, the test command in the test call."""
    spans: dict[str, list[tuple[int, int]]] = {"tool": [], "source_dir": [], "test_command": []}
    for key, before, value in (("tool", "<function=", task.shell_tool),
                               ("source_dir", "<parameter=command>\nls ", task.source_dir),
                               ("test_command", "<parameter=command>\n", task.test_command)):  # fmt: skip
        start = 0
        while (i := text.find(before + value, start)) >= 0:
            spans[key].append((i + len(before), i + len(before) + len(value)))
            start = i + 1
    return spans


def task_of(repo: str) -> Task:
    """The task whose repository is `repo` (KeyError for another name)."""
    return {t.repo: t for t in TASKS}[repo]


def convention_tokens(tokenizer, row: dict) -> tuple[list[int], dict[str, list[int]]]:
    """(token ids of the rendered row, {convention: indices t of the tokens that decide it}) for one testbed row:
    what a model must predict at t - 1 to follow the task's conventions. Per convention the first token that
    overlaps its span (" cli" of "ls cli_app": it often starts before the span), and for the tool only the first
    call's: under teacher forcing the later calls and the rest of each span follow from what is already in the
    context, while these tokens follow from the repository's name alone.

    The row is parsed as prepare-data parses it (tool-call arguments from their JSON strings to mappings), so the
    text is the one stage 1 and stage 2 see: rendered raw, the template would write the arguments' JSON and no
    `<parameter=...>` lines, and the folder and test-command spans would not be found."""
    from common.trajectories import parse_row

    traj = parse_row(row, row["trajectory_id"])
    text = tokenizer.apply_chat_template(traj.messages, tools=traj.tools, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    wanted = {}
    for key, spans in convention_spans(text, task_of(row["repo"])).items():
        lo, hi = spans[0]
        wanted[key] = [next(t for t, (a, b) in enumerate(offsets) if a < hi and b > lo)]
    return list(enc["input_ids"]), wanted


def convention_accuracy(model, tokenizer, splits: tuple[str, ...] = ("seen", "unseen"), per_task: int = 2) -> dict:
    """Teacher-forced top-1 accuracy of `model` on the tokens that decide the conventions (`convention_tokens`),
    per split, from `per_task` trajectories of each task: how well a model has learned the testbed (chance, for a
    model that knows the five tools and six test commands but not which task uses which: about 0.2 and 0.17)."""
    import torch

    out = {}
    model.eval()
    for split in splits:
        hits: dict[str, list[int]] = {"tool": [0, 0], "source_dir": [0, 0], "test_command": [0, 0]}
        rows = generate(split)
        rows = [r for i, r in enumerate(rows) if i % PER_TASK[split] < per_task]
        for row in rows:
            ids, wanted = convention_tokens(tokenizer, row)
            ids = torch.tensor(ids)
            with torch.no_grad():  # logits only where needed: [T, 151936] per trajectory is most of the cost
                hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
                for key, tokens in wanted.items():
                    if tokens:
                        at = torch.tensor(tokens)
                        pred = model.lm_head(hidden[at - 1]).argmax(-1)  # the guess for token t made at t - 1
                        hits[key][0] += int((pred == ids[at]).sum())
                        hits[key][1] += len(tokens)
        out[split] = {k: round(h / max(n, 1), 4) for k, (h, n) in hits.items()}
    return out
