"""Sampled cache rows (RS-KD): draws, their storage, reading back, verification and a stage-1 run."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_schema import CacheReader, CacheStore, SampleRows, SamplingMeta, verify_cache
from cache_schema.format import DRAW_COUNTS, PAD_LOGPROB, TOPK_COUNTS, TOPK_IDS, stored_positions
from cache_schema.sampled_rows import count_draws, decode_sampled
from cache_schema.synthetic import example_root_meta
from common.errors import UserError
from stage1_teacher.hf_backend import resolve_tail_draws
from stage1_teacher.sampling import TAIL_DRAW, draws_from_topk, sample_uniforms
from tests.stats import chi_square

VOCAB = 1000
N = 16


def naive_counts(row: np.ndarray) -> list[tuple[int, int]]:
    """(id, count) of one row's real draws, by descending count then ascending id."""
    ids, counts = np.unique(row[row >= 0], return_counts=True)
    return sorted(zip(ids.tolist(), counts.tolist()), key=lambda e: (-e[1], e[0]))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 6), st.integers(1, 12), st.integers(2, 20), st.integers(0, 2**32 - 1))
def test_count_draws_and_decode_round_trip(rows, n, vocab, seed):
    rng = np.random.default_rng(seed)
    draws = rng.integers(-1, vocab, size=(rows, n))
    counts, ids, dc = count_draws(draws)
    assert counts.dtype == np.uint32 and ids.dtype == np.uint32 and dc.dtype == np.uint16
    starts = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    for r in range(rows):
        got = list(zip(ids[starts[r]:starts[r + 1]].tolist(), dc[starts[r]:starts[r + 1]].tolist()))
        assert got == naive_counts(draws[r])
    width = n + 3
    dec = decode_sampled({TOPK_COUNTS: counts, TOPK_IDS: ids, DRAW_COUNTS: dc}, n, width, vocab + width)
    assert dec.ids.shape == dec.logprobs.shape == (rows, width)
    for r in range(rows):
        real = naive_counts(draws[r])
        k = len(real)
        assert dec.counts[r] == k
        assert dec.ids[r, :k].tolist() == [i for i, _ in real]
        np.testing.assert_allclose(np.exp(dec.logprobs[r, :k]), [c / n for _, c in real], rtol=1e-6)
        assert (dec.logprobs[r, k:] == PAD_LOGPROB).all()
        assert len(set(dec.ids[r].tolist())) == width  # padding ids are distinct and not among the entries
        assert dec.tail[r] == pytest.approx((draws[r] == -1).sum() / n, abs=1e-6)
        assert np.exp(dec.logprobs[r].astype(np.float64)).sum() + dec.tail[r] == pytest.approx(1.0, abs=1e-6)


def test_uniforms_are_stable_per_sample_and_seed():
    a = sample_uniforms(3, "traj-1", 5, 8)
    assert a.shape == (5, 8) and a.dtype == np.float64 and ((a >= 0) & (a < 1)).all()
    np.testing.assert_array_equal(a, sample_uniforms(3, "traj-1", 5, 8))
    assert not np.array_equal(a, sample_uniforms(4, "traj-1", 5, 8))
    assert not np.array_equal(a, sample_uniforms(3, "traj-2", 5, 8))


def test_draws_from_topk_follow_the_inverse_cdf():
    ids = np.array([[7, 3, 9], [1, 2, 4]])
    p = np.array([[0.5, 0.3, 0.1], [0.25, 0.25, 0.25]])
    u = np.array([[0.0, 0.49, 0.5, 0.79, 0.81, 0.95], [0.1, 0.3, 0.6, 0.74, 0.76, 0.99]])
    got = draws_from_topk(ids, np.log(p), u)
    np.testing.assert_array_equal(got, [[7, 7, 3, 3, 9, TAIL_DRAW], [1, 2, 4, 4, TAIL_DRAW, TAIL_DRAW]])


def test_empirical_weights_are_unbiased():
    """The mean of w = c/N over many independent rows tends to p (each w_i is Binomial(N, p_i) / N), within
    5 standard errors per entry; the tail weight tends to the tail mass."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(12, 0.5))
    order = np.argsort(-p)
    top = order[:8]  # top-8 "engine" rows: the rest is the tail
    reps, n = 4000, 8
    ids = np.tile(top, (reps, 1))
    logprobs = np.tile(np.log(p[top]), (reps, 1))
    u = np.concatenate([sample_uniforms(s, "row", 1, n) for s in range(reps)])
    draws = draws_from_topk(ids, logprobs, u)
    counts, flat_ids, dc = count_draws(draws)
    w = np.zeros(len(p))
    np.add.at(w, flat_ids.astype(np.int64), dc / n)
    w /= reps
    se = np.sqrt(p * (1 - p) / (n * reps))
    assert (np.abs(w[top] - p[top]) < 5 * se[top] + 1e-12).all()
    tail = p[order[8:]].sum()
    tail_w = 1 - w[top].sum()
    assert abs(tail_w - tail) < 5 * np.sqrt(tail * (1 - tail) / (n * reps))


def test_hf_tail_resolution_is_exact():
    """resolve_tail_draws on synthetic logits: the draws of every row, top-K and resolved tail together,
    have the frequencies of the full softmax (chi-square over the ids, cells pooled to >= 5 expected), and
    never land on a top-K id where a tail draw was resolved."""
    torch.manual_seed(0)
    vocab, k, rows, n = 40, 4, 400, 50
    logits = torch.randn(1, vocab).mul(1.5).expand(rows, vocab).contiguous()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    vals, top = torch.topk(logits, k, dim=-1)
    top_ids, top_lps = top.numpy().astype(np.uint32), (vals - lse).numpy()
    u = np.random.default_rng(1).random((rows, n))
    first = draws_from_topk(top_ids, top_lps, u)
    assert (first == TAIL_DRAW).any()
    got = resolve_tail_draws(logits, top_ids, top_lps, u, first.copy())
    assert (got >= 0).all() and (got < vocab).all()
    np.testing.assert_array_equal(got[first != TAIL_DRAW], first[first != TAIL_DRAW])
    assert not np.isin(got[first == TAIL_DRAW], top_ids[0]).any()
    p = torch.softmax(logits[0].double(), dim=-1).numpy()
    chi2, dof = chi_square(got, p)  # draws of one distribution: every row has the same logits
    # The 99.9% quantile of chi-square is below dof + 4.5 sqrt(2 dof) + 10 for these dof (Wilson-Hilferty).
    assert chi2 < dof + 4.5 * np.sqrt(2 * dof) + 10, (chi2, dof)


# ---------------------------------------------------------------------------------------------------------
# The cache with sampled rows


def sampled_meta(**overrides):
    fields = dict(k=8, vocab_size=VOCAB, num_shards=1, sampled=SamplingMeta(draws=N, seed=0, support_k=8))
    fields.update(overrides)
    return example_root_meta(**fields)


def sampled_sample(rng: np.random.Generator, sample_id: str, tokens: int = 300) -> SampleRows:
    mask = np.zeros(tokens, dtype=bool)
    mask[tokens // 3:] = True
    pos = stored_positions(mask, "assistant")
    # Zipf-like draws with some tail draws, like a teacher's.
    draws = np.minimum(rng.zipf(1.5, size=(len(pos), N)) - 2, VOCAB - 1)
    return SampleRows(sample_id=sample_id, input_ids=rng.integers(0, VOCAB, tokens), loss_mask=mask,
                      prompt_ids=rng.integers(0, VOCAB, 20), positions=pos, draws=draws)


def write(path: str, samples: list[SampleRows], meta=None) -> None:
    store = CacheStore.create_or_open(path, meta or sampled_meta())
    with store.open_part_writer(0, owner="test") as w:
        for s in samples:
            w.add(s)


def test_reader_returns_sampled_rows_as_cache_samples(tmp_path):
    rng = np.random.default_rng(0)
    samples = [sampled_sample(rng, f"s{i}") for i in range(3)]
    path = str(tmp_path / "c.zarr")
    write(path, samples)
    reader = CacheReader(path)
    assert reader.meta.sampled == SamplingMeta(draws=N, seed=0, support_k=8) and reader.meta.row_width == N
    for given_, got in zip(samples, reader):
        r = len(given_.positions)
        assert got.topk_ids.shape == got.topk_logprobs.shape == (r, N)
        total = np.exp(got.topk_logprobs.astype(np.float64)).sum(axis=1) + got.tail_mass
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
        for row in range(r):
            real = naive_counts(given_.draws[row])
            n = int(got.topk_counts[row])
            assert n == len(real) and got.topk_ids[row, :n].tolist() == [i for i, _ in real]
            assert (got.topk_logprobs[row, n:] == PAD_LOGPROB).all()
            assert len(set(got.topk_ids[row].tolist())) == N
            assert got.tail_mass[row] == pytest.approx((given_.draws[row] == -1).mean(), abs=1e-6)
    report = verify_cache(path)
    assert report.ok, [str(p) for p in report.problems]


@pytest.mark.parametrize("change, message", [
    (lambda s: {"draws": s.draws[:, :-1]}, "draws has shape"),
    (lambda s: {"draws": np.where(s.draws == 0, -2, s.draws)}, "outside [-1, 1000)"),
    (lambda s: {"draws": np.where(s.draws == 0, VOCAB, s.draws)}, "outside [-1, 1000)"),
    (lambda s: {"draws": s.draws.astype(np.float32)}, "must hold integers"),
    (lambda s: {"topk_ids": s.draws[:, :8], "topk_logprobs": np.zeros((len(s.positions), 8))}, "give draws"),
    (lambda s: {"draws": None}, "none of them"),
])
def test_writer_refuses_bad_draws(tmp_path, change, message):
    s = sampled_sample(np.random.default_rng(0), "bad")
    bad = SampleRows(**{**s.__dict__, **change(s)})
    store = CacheStore.create_or_open(str(tmp_path / "c.zarr"), sampled_meta())
    with pytest.raises(UserError, match="sample 'bad'.*" + re.escape(message)):
        with store.open_part_writer(0, owner="test") as w:
            w.add(bad)


def test_topk_cache_refuses_draws(tmp_path):
    s = sampled_sample(np.random.default_rng(0), "x")
    store = CacheStore.create_or_open(str(tmp_path / "c.zarr"), example_root_meta(num_shards=1, vocab_size=VOCAB))
    with pytest.raises(UserError, match="sample 'x'.*top-K rows"):
        with store.open_part_writer(0, owner="test") as w:
            w.add(s)


def test_root_identity_refuses_mixing_sampled_and_topk(tmp_path):
    path = str(tmp_path / "c.zarr")
    CacheStore.create_or_open(path, sampled_meta())
    with pytest.raises(UserError, match="sampled"):
        CacheStore.create_or_open(path, example_root_meta(k=8, vocab_size=VOCAB, num_shards=1))
    with pytest.raises(UserError, match="sampled"):
        CacheStore.create_or_open(path, sampled_meta(sampled=SamplingMeta(draws=N, seed=1, support_k=8)))
    d = sampled_meta().to_dict()
    assert type(sampled_meta()).from_dict(d, "x").sampled == SamplingMeta(draws=N, seed=0, support_k=8)


@pytest.mark.parametrize("overrides, message", [
    ({"mass_epsilon": 0.01}, "mass_epsilon"),
    ({"encoding": "qsqrt5"}, "encoding"),
    ({"sampled": {"draws": 0, "seed": 0}}, "draws must be"),
    ({"sampled": {"draws": 70000, "seed": 0}}, "draws must be"),
    ({"sampled": {"draws": 4, "seed": -1}}, "seed"),
    ({"sampled": {"draws": 4}}, "missing attribute 'seed'"),
    ({"sampled": {"draws": 64, "seed": 0}, "vocab_size": 32, "k": 8}, "exceeds vocab_size"),
])
def test_sampling_metadata_is_checked(overrides, message):
    with pytest.raises(UserError, match=message):
        sampled_meta(**overrides)


def corrupt_draw_counts(path: Path) -> None:
    """Rewrite part 0's draw_counts so that the first row's counts sum above N (same chunk layout)."""
    import zarr

    arr = zarr.open_array(str(path / "parts" / "00000" / DRAW_COUNTS), mode="r+")
    values = arr[:]
    values[0] = N + 1
    arr[:] = values


def test_verify_flags_counts_above_n(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "c.zarr"
    write(str(path), [sampled_sample(rng, "a"), sampled_sample(rng, "b")])
    corrupt_draw_counts(path)
    report = verify_cache(str(path))
    checks = {p.check for p in report.problems}
    assert "draw_counts" in checks and "checksum" in checks
    assert all(p.sample_id == "a" for p in report.problems)


def test_full_support_wants_every_draw(tmp_path):
    """With support 'full' (HF), a tail draw cannot exist: the writer refuses one, and verify flags rows whose
    counts sum below N (here: a top-K-support cache whose metadata is changed to 'full' afterwards)."""
    rng = np.random.default_rng(2)
    s = sampled_sample(rng, "a")
    assert (s.draws == -1).any()
    store = CacheStore.create_or_open(str(tmp_path / "full.zarr"), sampled_meta(sampled=SamplingMeta(draws=N, seed=0)))
    with pytest.raises(UserError, match="sample 'a'.*draws holds -1.*support is 'full'"):
        with store.open_part_writer(0, owner="test") as w:
            w.add(s)
    path = str(tmp_path / "c.zarr")
    write(path, [s])
    root = zarr.open_group(path, mode="r+")
    root.attrs["sampled"] = {**root.attrs["sampled"], "support_k": None}
    assert {p.check for p in verify_cache(path).problems} == {"draw_counts"}


def part_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((path / "parts").rglob("*")):
        if f.is_file() and f.name not in ("zarr.json", "writer.lease"):
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_parts(tmp_path):
    def run(root: Path, seed: int) -> str:
        rng = np.random.default_rng(5)
        samples = []
        for i in range(2):
            s = sampled_sample(rng, f"s{i}")
            ids = np.tile(np.arange(8), (len(s.positions), 1))
            lps = np.tile(np.log(np.full(8, 0.1)), (len(s.positions), 1))
            drawn = draws_from_topk(ids, lps, sample_uniforms(seed, s.sample_id, len(s.positions), N))
            samples.append(SampleRows(**{**s.__dict__, "draws": drawn}))
        write(str(root / "c.zarr"), samples)
        return part_digest(root / "c.zarr")

    assert run(tmp_path / "a", 0) == run(tmp_path / "b", 0)
    assert run(tmp_path / "c", 0) != run(tmp_path / "d", 1)


def test_config_validates_sampled_rows(tmp_path):
    from tests.pipeline_helpers import demo_config

    cfg = demo_config(tmp_path, "cache.rows=sampled", "cache.draws=32")
    assert cfg.cache.rows == "sampled" and cfg.cache.draws == 32
    for bad, message in [("cache.draws=0", "draws"), ("cache.draws=65536", "draws"),
                         ("cache.mass_epsilon=0.01", "mass_epsilon"), ("cache.encoding=qsqrt5", "encoding"),
                         ("cache.sample_seed=-1", "sample_seed")]:
        with pytest.raises(UserError, match=message):
            demo_config(tmp_path, "cache.rows=sampled", bad)


def test_inspect_and_show_describe_sampled_rows(tmp_path):
    from cache_schema import inspect_cache, show_sample

    rng = np.random.default_rng(3)
    samples = [sampled_sample(rng, f"s{i}") for i in range(2)]
    path = str(tmp_path / "c.zarr")
    write(path, samples)
    info = inspect_cache(path)
    draws = np.concatenate([s.draws for s in samples])
    assert info["rows_kind"] == "sampled" and info["draws"] == N and info["support"] == "top-8"
    assert info["entries_per_row"] == pytest.approx(np.mean([len(naive_counts(r)) for r in draws]))
    assert info["tail_draw_fraction"] == pytest.approx((draws == -1).mean())
    assert info["topk_bytes_per_row"] > 0
    text = show_sample(path, "s0", raw_ids=True, top=3)
    first = naive_counts(samples[0].draws[0])[0]
    assert f"N={N} draws, support top-8" in text
    assert f"{first[0]} {first[1]}x w={first[1] / N:.3f}" in text


def test_stage2_loss_on_sampled_rows_has_the_full_kl_gradient_in_expectation():
    """RS-KD end to end on the row format: stage 2's forward_tail loss at T = 1 on decoded sampled rows (full
    support), averaged over many independent draws, has the gradient of the full-vocabulary KL(p || s) with
    respect to the student's logits (s - p), where a top-K row's loss does not."""
    from stage2_student.losses import kl_from_logprobs

    rng = np.random.default_rng(1)
    vocab, n, reps = 40, 8, 3000
    p = torch.tensor(rng.dirichlet(np.full(vocab, 0.3)))
    logits = torch.tensor(rng.normal(size=vocab), requires_grad=True)
    # Full support: draws over the whole vocabulary (the HF backend's case), one row per repetition.
    order = torch.argsort(p, descending=True).numpy()
    u = np.concatenate([sample_uniforms(s, "row", 1, n) for s in range(reps)])
    draws = draws_from_topk(np.tile(order, (reps, 1)), np.tile(np.log(p.numpy()[order]), (reps, 1)), u)
    assert (draws != TAIL_DRAW).all()
    counts, ids, dc = count_draws(draws)
    rows = decode_sampled({TOPK_COUNTS: counts, TOPK_IDS: ids, DRAW_COUNTS: dc}, n, n, vocab)
    ids_t = torch.from_numpy(rows.ids)
    student_logp = torch.log_softmax(logits, dim=-1)[ids_t]  # [reps, N]: full-vocabulary softmax at the ids
    loss = kl_from_logprobs(student_logp, torch.from_numpy(rows.logprobs), "forward_tail").mean()
    (grad,) = torch.autograd.grad(loss, logits)
    exact = torch.softmax(logits, dim=-1) - p
    se = torch.sqrt(p * (1 - p) / (n * reps))  # the gradient's p-part is the mean of w, one binomial per id
    assert (grad - exact).abs().max() < 5 * se.max()
    # The same loss on the top-8 rows (renormalised with the tail bucket) is biased.
    top = torch.from_numpy(order[:8].copy())[None]
    topk_loss = kl_from_logprobs(torch.log_softmax(logits, dim=-1)[top], torch.log(p[top]), "forward_tail").mean()
    (topk_grad,) = torch.autograd.grad(topk_loss, logits)
    assert (topk_grad - exact).abs().max() > 8 * se.max()  # deterministic: no sampling noise to hide in


def test_draws_depend_on_the_row_alone_not_its_index_in_the_call():
    """Far down a long call the row lift of draws_from_topk rounds at float64's spacing there; the draw must
    still be the one the row gets alone (a uniform 1e-10 below a CDF edge stays below it)."""
    rows = 2**20
    ids = np.tile(np.array([[5, 6]], dtype=np.uint32), (rows, 1))
    logprobs = np.full((rows, 2), np.log(0.5), dtype=np.float32)
    u = np.full((rows, 1), float(np.exp(np.float64(np.float32(np.log(0.5))))) - 1e-10)
    alone = draws_from_topk(ids[-1:], logprobs[-1:], u[-1:])
    assert alone[0, 0] == 5
    assert draws_from_topk(ids, logprobs, u)[-1, 0] == alone[0, 0]


@pytest.mark.parametrize("row, message", [
    ([np.nan, np.log(0.2)], "not finite"),
    ([np.log(0.9), np.log(0.9)], "summing above 1"),
    ([np.log(0.1), np.log(0.6)], "rank order"),
])  # fmt: skip
def test_stage1_refuses_broken_teacher_rows_before_they_become_draws(row, message):
    """A sampled cache stores only the draws, so stage 1 checks the top-K rows they come from."""
    from cache_schema.row_checks import check_teacher_rows

    good = [np.log(0.6), np.log(0.3)]
    ids = np.array([[3, 4], [5, 6]], dtype=np.uint32)
    where = "cache c.zarr: sample 'traj-9': the teacher's top-K rows the draws come from"
    with pytest.raises(UserError, match=rf"sample 'traj-9'.*{message}.*first at position 41"):
        check_teacher_rows(ids, np.array([good, row], dtype=np.float32), VOCAB, np.array([40, 41]), where)
    check_teacher_rows(ids, np.array([good, good], dtype=np.float32), VOCAB, np.array([40, 41]), where)


def test_hf_tail_resolution_when_the_top_k_is_the_whole_vocabulary():
    """K = V: nothing lies outside the top-K, yet float rounding can leave the top-K's summed mass just below
    1 and u above it; the draw is then the top-K's last entry (not an error)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    top_lp, top_ids = torch.topk(torch.log_softmax(logits, dim=-1), 6, dim=-1)
    ids = top_ids.numpy().astype(np.uint32)
    logprobs = top_lp.numpy() - np.float32(1e-6)  # rounding's deficit, exaggerated: the mass sums to ~1 - 6e-6
    u = np.array([[1.0 - 1e-7, 0.0]])
    draws = draws_from_topk(ids, logprobs, u)
    assert draws[0, 0] == TAIL_DRAW and draws[0, 1] == ids[0, 0]
    out = resolve_tail_draws(logits, ids, logprobs, u, draws)
    assert out[0, 0] == ids[0, -1] and out[0, 1] == ids[0, 0]
