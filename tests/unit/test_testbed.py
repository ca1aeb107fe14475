"""The task-family testbed's generator: enough tasks, conventions that differ by task and are revealed only by the
repository's name, disjoint splits, and rows the pipeline reads and renders within the config's length."""

from __future__ import annotations

import json

import pytest

from common import testbed
from common.config import DataConfig
from common.trajectories import load_trajectories


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setattr(testbed, "testbed_home", lambda: tmp_path / "testbed")


def test_tasks_and_splits():
    assert len(testbed.TASKS) >= 24
    conventions = {(t.shell_tool, t.source_dir, t.test_command) for t in testbed.TASKS}
    assert len(conventions) == len(testbed.TASKS)  # no two tasks behave alike
    unseen = testbed.tasks_of("unseen")
    seen = testbed.tasks_of("seen")
    assert len(unseen) == 6 and len(seen) == 24 and not set(unseen) & set(seen)
    for t in unseen:  # its organisation and kind are each taught by seen tasks: the split is compositional
        assert sum(s.org == t.org for s in seen) >= 4 and sum(s.kind == t.kind for s in seen) >= 4
    ids = {split: [r["trajectory_id"] for r in testbed.generate(split)] for split in testbed.SPLITS}
    for split, got in ids.items():
        assert len(got) == len(set(got)) == testbed.PER_TASK[split] * len(testbed.tasks_of(split))
    assert not set(ids["teacher"]) & set(ids["seen"]) and not set(ids["seen"]) & set(ids["unseen"])
    assert testbed.generate("seen") == testbed.generate("seen")  # seeded
    assert {r["repo"] for r in testbed.generate("unseen")} == {t.repo for t in unseen}


def test_prompt_names_the_task_but_never_its_conventions():
    for row in testbed.generate("seen")[:: testbed.PER_TASK["seen"]]:
        task = next(t for t in testbed.TASKS if t.repo == row["repo"])
        system, user = row["trajectory"][0]["content"], row["trajectory"][1]["content"]
        assert task.repo in user
        for value in (task.shell_tool, task.source_dir + "/", task.test_command):
            assert value not in system + user
        said = json.dumps(row["trajectory"][2:])
        assert task.shell_tool in said and task.test_command in said and task.source_dir in said
        tools = {tool["function"]["name"] for tool in row["tools"]}
        assert {t.shell_tool for t in testbed.TASKS} <= tools  # every task offers every shell tool


def test_rows_load_render_and_locate_their_conventions(qwen_tokenizer):
    trajectories, report = load_trajectories(DataConfig(source="testbed:unseen"))
    assert report.dropped == 0 and len(trajectories) == len(testbed.generate("unseen"))
    by_repo = {t.repo: t for t in testbed.TASKS}
    for traj in trajectories[:: testbed.PER_TASK["unseen"]]:
        text = qwen_tokenizer.apply_chat_template(traj.messages, tools=traj.tools, tokenize=False)
        assert len(qwen_tokenizer(text)["input_ids"]) < 1024  # configs/testbed.yaml's data.max_tokens
        task = by_repo[traj.instance_id.rsplit("-", 1)[0].replace("__", "/")]
        spans = testbed.convention_spans(text, task)
        assert (len(spans["tool"]), len(spans["source_dir"]), len(spans["test_command"])) == (3, 1, 1)
        for lo, hi in spans["tool"]:
            assert text[lo:hi] == task.shell_tool
    with pytest.raises(Exception, match="testbed:SPLIT"):
        load_trajectories(DataConfig(source="testbed:nope"))


def test_student_split_draws_its_conventions_whatever_the_task():
    """The testbed student's corpus: every task, the same trajectories' shape, but the tool, folder and test command
    of each trajectory drawn at random, so a model trained on it cannot know which task uses which."""
    rows = testbed.generate("student")
    assert {r["repo"] for r in rows} == {t.repo for t in testbed.TASKS}
    assert not {r["trajectory_id"] for r in rows} & {r["trajectory_id"] for r in testbed.generate("teacher")}
    used = {"tool": set(), "dir": set(), "test": set()}
    own = 0
    for row in rows:
        task = testbed.task_of(row["repo"])
        calls = [m["tool_calls"][0]["function"] for m in row["trajectory"] if m.get("tool_calls")]
        tool, folder = calls[0]["name"], json.loads(calls[0]["arguments"])["command"].removeprefix("ls ")
        test = json.loads(calls[-1]["arguments"])["command"]
        used["tool"].add(tool), used["dir"].add(folder), used["test"].add(test)
        own += (tool, folder, test) == (task.shell_tool, task.source_dir, task.test_command)
        assert tool != testbed.EDITOR and calls[-2]["name"] == testbed.EDITOR
    assert used == {"tool": {t for t, _ in testbed.KINDS.values()}, "dir": {d for _, d in testbed.KINDS.values()},
                    "test": set(testbed.ORGS.values())}  # fmt: skip
    # By chance a trajectory has all three of its task's own conventions with p = 1/150: not the rule.
    assert own < len(rows) / 20
