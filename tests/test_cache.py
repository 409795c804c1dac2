"""--cache-dir and the latency cache hold untrusted files: planted links,
forged, corrupt, truncated, pickled or special entries are cache misses with
a warning, never an overwrite, a wrong result, an exit 1 or a hang."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess

import numpy as np
import onnx
import pytest

from clitools import assert_one_sentence, cli, main_in_process, snapshot
from graphs import cnn_model, conv_model
from onnx_alds.cache import save_spectra, spectra_key, spectra_path
from onnx_alds.folding import as_4d
from onnx_alds.spectra import compute_spectra


def _weights():
    from onnx import numpy_helper

    m = conv_model(f=8, c=6, seed=3)
    w = as_4d(numpy_helper.to_array(m.graph.initializer[0]))
    return {"conv": w}, {"conv": [(1, "s0"), (2, "s0"), (3, "s1")]}


def _all(spectra):
    return {(name, cfg): s for name, ls in spectra.items() for cfg, s in ls.sv.items()}


def test_cached_run_equals_uncached_and_reuses_entries(tmp_path):
    weights, configs = _weights()
    fresh = _all(compute_spectra(weights, configs, workers=1, progress=False))
    first = _all(compute_spectra(weights, configs, workers=1, progress=False, cache_dir=tmp_path))
    entries = sorted(tmp_path.iterdir())
    assert len(entries) == len(fresh) and all(p.suffix == ".npz" for p in entries)
    mtimes = [p.stat().st_mtime_ns for p in entries]
    again = _all(compute_spectra(weights, configs, workers=1, progress=False, cache_dir=tmp_path))
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.iterdir())] == mtimes  # hits, not rewrites
    for key in fresh:
        np.testing.assert_array_equal(first[key], fresh[key])
        np.testing.assert_array_equal(again[key], fresh[key])


def test_planted_links_are_never_followed(tmp_path):
    """Links at every name a cache write could use (the entry itself and the old
    predictable ``<sha1>.<pid>.tmp.npy``) leave their targets untouched."""
    weights, configs = _weights()
    cache, victim = tmp_path / "cache", tmp_path / "victim.txt"
    cache.mkdir()
    victim.write_text("precious\n")
    w = weights["conv"]
    for k, s in {(k, s) for k, s in configs["conv"]} | {(1, s) for _, s in configs["conv"]}:
        key = spectra_key(w, s, k)
        for name in (f"{key}.npz", f"{key}.npy", f"{key}.{os.getpid()}.tmp.npy", f"{key}.npz.tmp"):
            (cache / name).symlink_to(victim)
    fresh = _all(compute_spectra(weights, configs, workers=1, progress=False))
    got = _all(compute_spectra(weights, configs, workers=1, progress=False, cache_dir=cache))
    assert victim.read_text() == "precious\n"
    for key in fresh:
        np.testing.assert_array_equal(got[key], fresh[key])
    # the entries are regular files now (the links were replaced, not written through)
    assert all(not spectra_path(cache, spectra_key(w, s, k)).is_symlink() for k, s in configs["conv"])


def _forge(cache, w, k, s, sv):
    save_spectra(cache, spectra_key(w, s, k), sv)


@pytest.mark.parametrize("forgery", ["zero_tail", "wrong_shape", "negative", "nan", "ascending", "other_key",
                                     "float32"])
def test_forged_well_formed_entries_are_misses(tmp_path, forgery, caplog):
    """A well-formed entry whose values do not belong to the weights (a tail of
    zeros would claim error 0) is ignored with a warning."""
    weights, configs = _weights()
    w = weights["conv"]
    fresh = compute_spectra(weights, configs, workers=1, progress=False)
    for (k, s), sv in fresh["conv"].sv.items():
        bad = sv.copy()
        if forgery == "zero_tail":  # keeps the shape, the order and σ₁, claims rank-1 is exact
            bad[:, 1:] = 0.0
        elif forgery == "wrong_shape":
            bad = bad[:, :-1]
        elif forgery == "negative":
            bad[:, -1] = -1.0
        elif forgery == "nan":
            bad[0, 0] = np.nan
        elif forgery == "ascending":
            bad = bad[:, ::-1]
        elif forgery == "float32":
            bad = bad.astype(np.float32)
        if forgery == "other_key":
            path = spectra_path(tmp_path, spectra_key(w, s, k))
            buf = io.BytesIO()
            np.savez(buf, key=np.array("0" * 40), sv=sv)
            path.write_bytes(buf.getvalue())
        elif forgery == "float32":
            buf = io.BytesIO()
            np.savez(buf, key=np.array(spectra_key(w, s, k)), sv=bad)
            spectra_path(tmp_path, spectra_key(w, s, k)).write_bytes(buf.getvalue())
        else:
            _forge(tmp_path, w, k, s, bad)
    with caplog.at_level(logging.WARNING, logger="onnx_alds"):
        got = compute_spectra(weights, configs, workers=1, progress=False, cache_dir=tmp_path)
    for cfg, sv in fresh["conv"].sv.items():
        np.testing.assert_array_equal(got["conv"].sv[cfg], sv)
        np.testing.assert_array_equal(got["conv"].error_curve(*cfg), fresh["conv"].error_curve(*cfg))
    assert sum("ignored" in r.getMessage() for r in caplog.records) == len(fresh["conv"].sv)


def _corrupt_entries(cache, kind):
    for p in sorted(cache.iterdir()):
        if kind == "truncated":
            p.write_bytes(p.read_bytes()[:50])
        elif kind == "garbage":
            p.write_bytes(b"\x00garbage" * 20)
        elif kind == "empty":
            p.write_bytes(b"")
        elif kind == "pickled":  # an object array: np.load needs allow_pickle for it
            buf = io.BytesIO()
            np.savez(buf, key=np.array([{"k": 1}], dtype=object), sv=np.array([1.0, "x"], dtype=object))
            p.write_bytes(buf.getvalue())
        elif kind == "fifo":
            p.unlink()
            os.mkfifo(p)
        elif kind == "directory":
            p.unlink()
            p.mkdir()
        elif kind == "unreadable_link":
            p.unlink()
            p.symlink_to("/nonexistent/target")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "pickled", "fifo", "directory",
                                  "unreadable_link"])
def test_bad_entries_are_misses_in_the_cli(tmp_path, kind, capsys, caplog):
    """Exit 0, the same model as without a cache, a warning (a FIFO, which
    blocked a plain open, through a real process with a timeout)."""
    def run(*args, **kw):
        if kind == "fifo":
            return cli(*args, **kw)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onnx_alds"):
            rc, out, err = main_in_process(capsys, *args)
        return rc, out, err + caplog.text

    src = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(src))
    cache = tmp_path / "cache"
    ref = tmp_path / "ref.onnx"
    assert run("rewrite", src, ref, "--no-validate", "--no-compare", "-q", "--keep-params", "0.5", "--cache-dir",
               cache)[0] == 0
    _corrupt_entries(cache, kind)
    out = tmp_path / "out.onnx"
    rc, _, err = run("rewrite", src, out, "--no-validate", "--no-compare", "-q", "--keep-params", "0.5",
                     "--cache-dir", cache, timeout=120)
    assert rc == 0, err
    assert out.read_bytes() == ref.read_bytes()
    assert "cache entry" in err and "ignored" in err and "Traceback" not in err
    entries = sorted(cache.iterdir())
    assert not [p for p in entries if p.name.startswith(".")]  # no temporary file left
    if kind == "directory":  # cannot be replaced: left alone
        assert all(p.is_dir() for p in entries)
    else:  # the bad entry was replaced (the link or FIFO itself, never written through) by a good one
        assert all(p.is_file() and not p.is_symlink() for p in entries)
        rc, _, err = run("rewrite", src, out, "--no-validate", "--no-compare", "-q", "--cache-dir", cache)
        assert rc == 0 and "ignored" not in err


def test_cache_dir_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    src = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(src))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, afile / "sub"):
        rc, _, err = main_in_process(capsys, "rewrite", src, tmp_path / "o.onnx", "--no-validate", "--cache-dir", bad)
        assert rc == 2 and "--cache-dir" in err
        assert_one_sentence(err)
        assert not (tmp_path / "o.onnx").exists() and afile.read_text() == "x"


def test_read_only_cache_dir_is_a_usage_error(tmp_path, capsys):
    """A real read-only file system (root's os.access would say writable)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only file system needs root")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        src = tmp_path / "cnn.onnx"
        onnx.save(cnn_model(), str(src))
        rc, _, err = main_in_process(capsys, "rewrite", src, tmp_path / "o.onnx", "--no-validate", "--cache-dir", mnt)
        assert rc == 2 and "not writable" in err
        assert_one_sentence(err)
        assert not (tmp_path / "o.onnx").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ----------------------------------------------------------------------------------- latency cache

@pytest.fixture(scope="module")
def latency_setup(tmp_path_factory):
    from onnx_alds.api import analyze
    from onnx_alds.measure.latency_table import LatencyTable

    model = cnn_model()
    _, _, info = analyze(model)
    cache = tmp_path_factory.mktemp("latency")
    table = LatencyTable.for_model(model, info, cache_dir=cache, k_max=1, points=2)
    assert table.measured > 0
    return model, info, cache, {p.name: p.read_bytes() for p in cache.iterdir()}


@pytest.mark.parametrize("kind", ["not_json", "truncated", "nan", "other_key", "negative_ms", "fifo", "list"])
def test_bad_latency_entries_are_remeasured(latency_setup, tmp_path, kind, caplog):
    from onnx_alds.measure.latency_table import LatencyTable

    model, info, good, entries = latency_setup
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = next(iter(sorted(entries)))
    for name, data in entries.items():
        (cache / name).write_bytes(data)
    p = cache / victim
    entry = json.loads(entries[victim])
    if kind == "not_json":
        p.write_bytes(b"{ this is not json")
    elif kind == "truncated":
        p.write_bytes(entries[victim][: len(entries[victim]) // 2])
    elif kind == "nan":
        p.write_text(json.dumps(entry).replace(str(next(iter(entry["ms"].values()))), "NaN", 1))
    elif kind == "other_key":
        entry["key"]["threads"] = 99
        p.write_text(json.dumps(entry))
    elif kind == "negative_ms":
        entry["ms"] = {t: -1.0 for t in entry["ms"]}
        p.write_text(json.dumps(entry))
    elif kind == "list":
        p.write_text("[1, 2, 3]")
    elif kind == "fifo":
        p.unlink()
        os.mkfifo(p)
    with caplog.at_level(logging.WARNING, logger="onnx_alds"):
        table = LatencyTable.for_model(model, info, cache_dir=cache, k_max=1, points=2)
    n_victim = len(json.loads(entries[victim])["ms"])
    assert table.measured == n_victim  # exactly the bad entry's measurements are taken again
    assert all(np.isfinite(lt.orig_ms) and lt.orig_ms >= 0 for lt in table.layers.values())
    assert any("ignored" in r.getMessage() for r in caplog.records)
    if kind != "fifo":  # rewritten as a valid entry
        assert json.loads(p.read_text())["ms"].keys() == json.loads(entries[victim])["ms"].keys()


def test_unusable_default_latency_cache_warns_and_measures(latency_setup, tmp_path, monkeypatch, caplog):
    from onnx_alds.measure.latency_table import LatencyTable

    model, info, _, _ = latency_setup
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("ONNX_ALDS_CACHE", str(afile))
    with caplog.at_level(logging.WARNING, logger="onnx_alds"):
        table = LatencyTable.for_model(model, info, k_max=1, points=2)
    assert table.measured > 0 and afile.read_text() == "x"
    assert any("without a cache" in r.getMessage() for r in caplog.records)


def test_corrupt_latency_cache_through_the_cli(tmp_path):
    """The reported exit 1: $ONNX_ALDS_CACHE with a corrupt JSON entry."""
    src = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(src))
    env = dict(os.environ, ONNX_ALDS_CACHE=str(tmp_path / "c"))
    rc, _, err = cli("rewrite", src, tmp_path / "a.onnx", "--keep-latency", "0.9", "--no-validate", "--no-compare",
                     "-q", env=env)
    assert rc in (0, 4), err
    entries = list((tmp_path / "c" / "latency").iterdir())
    assert entries
    for p in entries:
        p.write_text("{corrupt")
    before = snapshot(tmp_path / "c")
    rc2, _, err = cli("rewrite", src, tmp_path / "b.onnx", "--keep-latency", "0.9", "--no-validate", "--no-compare",
                      "-q", env=env)
    # feasibility of 0.9 depends on the timings, which were measured anew: 0 or 4, never a crash
    assert rc2 in (0, 4) and "Traceback" not in err and "ignored" in err
    assert snapshot(tmp_path / "c") != before  # re-measured and rewritten
    assert all(json.loads(p.read_text())["ms"] for p in entries)
