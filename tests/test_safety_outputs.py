"""What a conversion may do to the filesystem (issue #11, phase 2): `--overwrite` replaces only a previous output of
the same kind, never a source, its parent or a foreign directory; a directory that appears during the run is
never replaced; two jobs on one output: the second is refused; `kill -9` at any point leaves no complete-looking
output, and the next run cleans up (and says so) and converts correctly; a full disk is one line naming the file."""

from __future__ import annotations

import filecmp
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TESTS, cli_refuses
from safetensors.torch import load_file, save_file

from hetero_convert.convert import ConversionError, hf_to_megatron, megatron_to_hf
from hetero_convert.io import staging
from hetero_convert.io.safe_pickle import load_dcp_metadata
from hetero_convert.io.staging import MEGATRON, PRUNE, Owner, Staging, check_output

SOURCE = "tiny-every-kind"


@pytest.fixture(scope="module")
def refs(tiny_sources, tmp_path_factory) -> dict[str, Path]:
    """The source, and what each direction must produce from it (hf-to-megatron at TP 2, and back)."""
    root = tmp_path_factory.mktemp("refs")
    hf_to_megatron(tiny_sources[SOURCE], root / "meg", tp=2)
    megatron_to_hf(root / "meg", root / "hf")
    return {"src": tiny_sources[SOURCE], "meg": root / "meg", "hf": root / "hf"}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too) and its bytes: a directory that was not touched has the same."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_output(a: Path, b: Path) -> None:
    """Two outputs of the same conversion: the same files with the same bytes (DCP's `.metadata` carries a
    fresh save id each time: its tensor and storage records must be equal)."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for n in names:
        if Path(n).name == ".metadata":
            ma, mb = load_dcp_metadata(a / n), load_dcp_metadata(b / n)
            assert ma.state_dict_metadata == mb.state_dict_metadata and ma.storage_data == mb.storage_data, n
        else:
            assert filecmp.cmp(a / n, b / n, shallow=False), n


def hidden(parent: Path, out: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out}."))


# ---- --overwrite replaces only what this tool wrote -------------------------------------------------------------


def foreign_dirs(root: Path) -> dict[str, Path]:
    thesis = root / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\chapter{Five years}")
    (thesis / "figures" / "a.pdf").write_bytes(b"%PDF")
    repo = root / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "model.py").write_text("print('mine')\n")
    return {"thesis": thesis, "repo": repo, "git": repo / ".git"}


def test_overwrite_never_deletes_the_source_its_parent_or_a_foreign_directory(refs, tmp_path):
    work = tmp_path / "work"
    src = Path(shutil.copytree(refs["src"], work / "src"))
    meg = Path(shutil.copytree(refs["meg"], work / "meg"))
    foreign = foreign_dirs(tmp_path)
    (work / "meg-plus").mkdir()  # a Megatron checkpoint root with someone's notes in it
    shutil.copytree(meg, work / "meg-plus", dirs_exist_ok=True)
    (work / "meg-plus" / "notes.txt").write_text("run 7: lr 3e-4")
    hf_plus = Path(shutil.copytree(refs["hf"], work / "hf-plus"))
    (hf_plus / "README.md").write_text("# model card")
    # Look like outputs by their names alone: a training run's root, a release folder with a user's file in it,
    # one that megatron-core saved (no description of ours), and a HF checkpoint another tool wrote.
    run = work / "run"
    for it in ("iter_0000050", "iter_0000100"):
        shutil.copytree(meg / "release", run / it)
    (run / "latest_checkpointed_iteration.txt").write_text("100")
    meg_note = Path(shutil.copytree(meg, work / "meg-note"))
    (meg_note / "release" / "precious.txt").write_text("keep")
    meg_core = Path(shutil.copytree(meg, work / "meg-core"))
    (meg_core / "release" / "hetero_convert.json").unlink()
    hub = Path(shutil.copytree(refs["hf"], work / "hub"))
    for f in hub.glob("*.safetensors"):
        save_file(load_file(f), f, metadata={"format": "pt"})  # the same weights, as transformers saves them
    (work / "a-file").write_text("x")
    shutil.copytree(meg, src / "meg")  # an earlier output made inside the source folder (allowed: it was new)
    before = {"tmp": tree(tmp_path)}
    cases = [
        (["hf-to-megatron", src, src], f"{src}: refused as the output: it is the source {src}"),
        (["hf-to-megatron", src, work], f"{work}: refused as the output: it contains the source {src}"),
        (["hf-to-megatron", src, src / "meg"], "refused as the output: it lies inside the source"),
        (["hf-to-megatron", src, foreign["thesis"]], "--overwrite refused: it has no latest_checkpointed_iteration.txt"
                                                     ", so it is not a Megatron checkpoint root"),
        (["hf-to-megatron", src, foreign["repo"]], "it has no latest_checkpointed_iteration.txt"),
        (["hf-to-megatron", src, foreign["git"]], "it has no latest_checkpointed_iteration.txt"),
        (["hf-to-megatron", src, work / "meg-plus"], "it holds 'notes.txt', which hetero-convert does not write in a "
                                                     "Megatron checkpoint root"),
        (["hf-to-megatron", src, run], "it holds 'iter_0000050' (a training run's iteration folder)"),
        (["megatron-to-megatron", meg, meg_note], "its release folder: it holds 'precious.txt', which hetero-convert "
                                                  "does not write in a Megatron iteration folder"),
        (["hf-to-megatron", src, meg_core], "its release folder has no hetero_convert.json, so hetero-convert did "
                                            "not write it"),
        (["megatron-to-hf", meg, hub], "its 'model.safetensors' was not written by hetero-convert (no hetero-convert "
                                       "mark in its header"),
        (["hf-to-megatron", src, work / "a-file"], "exists and is not a directory"),
        (["megatron-to-hf", meg, meg], f"{meg}: refused as the output: it is the source {meg}"),
        (["megatron-to-hf", meg / "release", meg], "it contains the source"),
        (["megatron-to-hf", meg, meg / "release"], "it lies inside the source"),
        (["megatron-to-hf", meg, foreign["thesis"]], "it has no config.json and safetensors weights, so it is not a "
                                                     "HF checkpoint directory"),
        (["megatron-to-hf", meg, foreign["git"]], "not a HF checkpoint directory"),
        (["megatron-to-hf", meg, hf_plus], "it holds 'README.md', which hetero-convert does not write in a HF "
                                           "checkpoint directory"),
        (["megatron-to-hf", meg, src, "--tokenizer-from", src], f"it is the source {src}"),
        (["megatron-to-megatron", meg, meg], "it is the source"),
        (["megatron-to-megatron", meg, tmp_path], "it contains the source"),
    ]
    for args, message in cases:
        cli_refuses([*args, "--overwrite"], message, "only a" if "--overwrite refused" in message else "")
        assert tree(tmp_path) == before["tmp"], args  # nothing deleted, nothing added (no lock file left either)
    link = tmp_path / "link"
    link.symlink_to(meg)
    with pytest.raises(ConversionError, match="refused as the output: it is a symbolic link"):
        hf_to_megatron(src, link, overwrite=True)
    # Without --overwrite a non-empty directory is refused as before.
    cli_refuses(["hf-to-megatron", src, foreign["thesis"]], "exists and is not empty, and --overwrite would not "
                                                            "replace it either: it has no latest_checkpointed")
    cli_refuses(["hf-to-megatron", src, meg], "exists and is not empty (it holds a previous Megatron checkpoint root: "
                                              "--overwrite replaces it)")
    assert tree(tmp_path) == before["tmp"]


def test_overwrite_replaces_a_previous_output_of_the_same_kind(refs, tmp_path):
    hf_to_megatron(refs["src"], tmp_path / "meg", tp=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "hf")
    (tmp_path / "meg" / "release" / "__9_0.distcp").write_bytes(b"left from an older run")
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "model-00007-of-00009.safetensors")
    hf_to_megatron(refs["src"], tmp_path / "meg", tp=2, overwrite=True)
    megatron_to_hf(tmp_path / "meg", tmp_path / "hf", overwrite=True)
    assert_same_output(tmp_path / "meg", refs["meg"])
    assert_same_output(tmp_path / "hf", refs["hf"])
    assert hidden(tmp_path, "meg") == hidden(tmp_path, "hf") == []  # no staging, old output or lock file left
    with pytest.raises(ConversionError, match="exists and is not empty"):
        hf_to_megatron(refs["src"], tmp_path / "meg", tp=2)


def test_prune_output_kind(refs, tmp_path):
    """What prune may write over (its own outputs, again, even without --overwrite: it reuses its scores from
    there), and what not: a directory holding a pruning_report.json next to anything else."""
    from hetero_convert.io.outputs import PRUNE_FILES, PRUNE_FOLDERS
    from hetero_convert.pruning.export import REPORT_FILE
    from hetero_convert.pruning.fits import FITS_DIR, FITS_META, FitStore
    from hetero_convert.pruning.scoring import SCORES_FILE

    # io cannot import pruning: the names are repeated there
    assert set(PRUNE_FILES) == {SCORES_FILE, REPORT_FILE} and set(PRUNE_FOLDERS) == {FITS_DIR}
    assert FITS_META in PRUNE_FOLDERS[FITS_DIR] and FitStore(tmp_path).path(3).name == "layer-00003.safetensors"
    out = tmp_path / "pruned"
    (out / "prune_fits").mkdir(parents=True)
    (out / "prune_scores.json").write_text("{}")
    (out / "prune_fits" / "layer-00000.safetensors").write_bytes(b"")
    check_output(out, PRUNE, overwrite=False, sources=[refs["src"]])  # scores of a run whose export failed
    (out / "prune_fits" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="its prune_fits folder holds 'notes.txt', which hetero-convert does "
                                              "not write"):
        check_output(out, PRUNE, overwrite=True)
    (out / "prune_fits" / "notes.txt").unlink()
    shutil.copytree(refs["hf"], out, dirs_exist_ok=True)
    (out / "pruning_report.json").write_text("{}")
    check_output(out, PRUNE, overwrite=False, sources=[refs["src"]])  # a complete prune output, run again
    (out / "thesis.tex").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match="it holds 'thesis.tex', which hetero-convert does not write in a "
                                                  "HF checkpoint directory"):
            check_output(out, PRUNE, overwrite=overwrite)
        # Also through the staging prune's exporter uses today (no kind: any output of this tool, nothing else).
        with pytest.raises(ConversionError, match="--overwrite refused: it is none of what hetero-convert writes"), \
                Staging(out, overwrite=True) as stage:
            stage.begin()
    assert (out / "thesis.tex").read_text() == "mine"
    with pytest.raises(ConversionError, match="it is the source"):
        check_output(refs["src"], PRUNE, overwrite=True, sources=[refs["src"]])


# ---- the final step never replaces what it did not check ------------------------------------------------------


def appear_during_the_run(monkeypatch, make):
    """Run `make()` while the job writes its data (after its checks, before it publishes)."""
    from hetero_convert.convert import driver

    real = driver.write_groups

    def write_groups(*a, **k):
        make()
        return real(*a, **k)

    monkeypatch.setattr(driver, "write_groups", write_groups)


def test_a_directory_that_appears_during_the_run_is_not_replaced(refs, tmp_path, monkeypatch):
    out = tmp_path / "meg"

    def someone_elses():
        out.mkdir()
        (out / "results.csv").write_text("a,b\n1,2\n")

    appear_during_the_run(monkeypatch, someone_elses)
    with pytest.raises(ConversionError, match=r"meg: exists and is not empty, and --overwrite would not replace it "
                                              r"either: .* \(it changed while this job ran; this job's output is "
                                              r"discarded\)"):
        hf_to_megatron(refs["src"], out, tp=2)
    assert tree(out) == {"results.csv": b"a,b\n1,2\n"} and hidden(tmp_path, "meg") == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "rename-fallback"])
def test_a_directory_that_appears_at_the_instant_of_publishing_is_not_replaced(refs, tmp_path, monkeypatch,
                                                                                renameat2):
    """After the last check, before the rename: the rename itself refuses (RENAME_NOREPLACE; elsewhere rename(2)
    never replaces a non-empty directory)."""
    if renameat2:
        assert staging._renameat2() is not None  # this glibc has it: the test exercises it
    else:
        monkeypatch.setattr(staging, "_libc_renameat2", False)  # as where glibc or the filesystem lacks it
    out = tmp_path / "meg"
    real = staging.rename_noreplace

    def rename(src, dst):
        if Path(dst) == out:
            out.mkdir()
            (out / "results.csv").write_text("a,b\n1,2\n")
        real(src, dst)

    monkeypatch.setattr(staging, "rename_noreplace", rename)
    with pytest.raises(ConversionError, match=f"{out}: appeared while this job ran; it is not replaced, and this "
                                              f"job's output is discarded"):
        hf_to_megatron(refs["src"], out, tp=2)
    assert tree(out) == {"results.csv": b"a,b\n1,2\n"} and hidden(tmp_path, "meg") == []


def test_an_output_swapped_for_a_foreign_directory_during_the_run_is_not_replaced(refs, tmp_path, monkeypatch):
    out = Path(shutil.copytree(refs["meg"], tmp_path / "meg"))

    def swapped():
        shutil.rmtree(out)
        out.mkdir()
        (out / "thesis.tex").write_text("mine")

    appear_during_the_run(monkeypatch, swapped)
    with pytest.raises(ConversionError, match="--overwrite refused: it has no latest_checkpointed_iteration.txt.*"
                                              r"\(it changed while this job ran; this job's output is discarded\)"):
        hf_to_megatron(refs["src"], out, tp=2, overwrite=True)
    assert tree(out) == {"thesis.tex": b"mine"} and hidden(tmp_path, "meg") == []


def test_the_directory_renamed_aside_is_checked_again_before_it_is_deleted(refs, tmp_path, monkeypatch):
    """Between the last check and the rename aside, a file lands in OUT: the renamed directory is what would be
    deleted, so it is checked there, and put back."""
    out = Path(shutil.copytree(refs["meg"], tmp_path / "meg"))
    real = staging.rename_noreplace

    def rename(src, dst):
        if ".old-" in Path(dst).name:
            (Path(src) / "draft.docx").write_text("mine")
        real(src, dst)

    monkeypatch.setattr(staging, "rename_noreplace", rename)
    with pytest.raises(ConversionError, match=f"{out}: changed while this job ran \\(it holds 'draft.docx', which "
                                              f"hetero-convert does not write in a Megatron checkpoint root\\); it "
                                              f"is left as it is"):
        hf_to_megatron(refs["src"], out, tp=2, overwrite=True)
    assert (out / "draft.docx").read_text() == "mine" and (out / "release" / ".metadata").is_file()
    assert hidden(tmp_path, "meg") == []


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(refs, tmp_path):
    out = tmp_path / "meg"
    with Staging(out, overwrite=False, kind=MEGATRON) as first:
        first.begin()
        with pytest.raises(ConversionError, match=f"{out}: another hetero-convert job \\(pid {os.getpid()} on "
                                                  f".*\\) is writing this output now; refused"):
            hf_to_megatron(refs["src"], out, tp=2)
        with pytest.raises(ConversionError, match="another hetero-convert job"):
            megatron_to_hf(refs["meg"], out)
    assert hidden(tmp_path, "meg") == []  # the first left nothing: it failed before committing
    hf_to_megatron(refs["src"], out, tp=2)
    assert_same_output(out, refs["meg"])


# ---- what killed runs leave, and the next run ---------------------------------------------------------------------


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_next_run_removes_stale_staging_folders_and_says_so(refs, tmp_path, caplog):
    me = Owner.me()
    host = me.host
    dead = dead_pid()
    stale = [f".meg.partial-{host}-{dead}-12345", f".meg.partial-{dead}",  # killed; an older version's name
             f".meg.partial-{host}-{os.getpid()}-{me.start + 1}"]  # this PID, another process (PID reused)
    alive = f".meg.partial-{host}-{os.getppid()}-{staging._start_ticks(os.getppid())}"  # a running owner
    elsewhere = ".meg.partial-node7-4242-99"  # another host: cannot be checked from here
    for name in stale + [alive, elsewhere]:
        (tmp_path / name / "release").mkdir(parents=True)
        (tmp_path / name / "release" / "__0_0.distcp").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="hetero_convert"):
        hf_to_megatron(refs["src"], tmp_path / "meg", tp=2)
    assert_same_output(tmp_path / "meg", refs["meg"])
    assert hidden(tmp_path, "meg") == sorted([alive, elsewhere])
    said = caplog.text
    for name in stale:
        assert f"removed {tmp_path / name}: the staging folder of a run (pid " in said
    assert f"left {tmp_path / elsewhere}: written by pid 4242 on node7, which cannot be checked from here" in said
    assert alive not in said


def test_the_next_run_restores_an_output_a_kill_left_under_its_hidden_name(refs, tmp_path, caplog):
    """A kill between the two renames of --overwrite leaves the previous output only under its hidden name: the
    next run puts it back (and then, with --overwrite, replaces it as asked)."""
    old = tmp_path / f".meg.old-{Owner.me().host}-{dead_pid()}-777-for-123"
    shutil.copytree(refs["meg"], old)
    with caplog.at_level(logging.WARNING, logger="hetero_convert"), \
            pytest.raises(ConversionError, match="exists and is not empty"):
        hf_to_megatron(refs["src"], tmp_path / "meg", tp=2)
    assert f"restored {tmp_path / 'meg'} from {old.name}: the previous output, left under that name by a run" \
           in caplog.text
    assert tree(tmp_path / "meg") == tree(refs["meg"]) and hidden(tmp_path, "meg") == []
    # Killed after the new output was in place, before the old one was deleted: the old one goes.
    shutil.copytree(refs["meg"], old)
    os.rename(old, tmp_path / f".meg.old-{Owner.me().host}-{dead_pid()}-777-for-{(tmp_path / 'meg').stat().st_ino}")
    # An old output whose replacement never arrived (OUT is something else now) is kept, and named.
    kept = tmp_path / f".meg.old-{Owner.me().host}-{dead_pid()}-777-for-1"
    shutil.copytree(refs["meg"], kept)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hetero_convert"):
        hf_to_megatron(refs["src"], tmp_path / "meg", tp=2, overwrite=True)
    assert "the output a run (pid" in caplog.text and "replaced before it was killed" in caplog.text
    assert f"left {kept}: a previous output of {tmp_path / 'meg'} that a run" in caplog.text
    assert hidden(tmp_path, "meg") == [kept.name]
    assert_same_output(tmp_path / "meg", refs["meg"])


class Run:
    """The CLI in its own process (tests/killed_cli.py), stopping at the points asked for."""

    def __init__(self, tmp: Path, args: list, pauses: str, tag: str):
        self.dir = tmp / f"run-{tag}"
        self.dir.mkdir()
        self.err = open(self.dir / "stderr", "w+")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "HC_PAUSES": pauses,
               "HC_DIR": str(self.dir), "OMP_NUM_THREADS": "1"}
        env.pop("HETERO_CONVERT_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "killed_cli", *map(str, args)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.err, stdin=subprocess.DEVNULL)

    def wait_for(self, point: str, timeout: float = 120) -> None:
        end = time.time() + timeout
        while not (self.dir / point).exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {point}: {self.stderr()}")
            assert time.time() < end, f"never reached {point}"
            time.sleep(0.02)

    def go(self, point: str) -> None:
        (self.dir / f"{point}.go").touch()

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def finish(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self.err.flush()
        return (self.dir / "stderr").read_text()


DIRECTIONS = {"hf-to-megatron": (["--tp", "2"], "src", "meg"), "megatron-to-hf": ([], "meg", "hf")}


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_kill_9_at_any_point_leaves_no_output_and_the_next_run_cleans_up(refs, tmp_path, direction):
    """Killed at random points while writing, before publishing, between the two renames of --overwrite and
    after them: OUT is never a partial output (absent, or the previous output untouched), and the next run
    says what it removed or restored and converts correctly. The processes start together (the start-up is
    most of their time) and wait at `ready` until their turn."""
    options, src_key, ref_key = DIRECTIONS[direction]
    out = tmp_path / "out"
    cmd = [direction, refs[src_key], out, *options]
    seed = os.environ.get("HC_KILL_SEED", str(time.time_ns()))  # printed on failure: HC_KILL_SEED=... repeats it
    rng = random.Random(seed)
    plan = [("random", ""), ("random", ""), ("commit", ""), ("recover", ""),
            ("between-renames", "--overwrite"), ("published", "--overwrite"), ("recover", "")]
    runs = [Run(tmp_path, cmd + ([flag] if flag else []), f"ready,{point}", f"{k}-{point}")
            for k, (point, flag) in enumerate(plan)]
    for r in runs:
        r.wait_for("ready")

    for run, (point, _) in zip(runs[:3], plan[:3]):  # fresh OUT: killed while writing, or complete but unpublished
        run.go("ready")
        if point == "random":
            time.sleep(rng.uniform(0, 0.5))
        else:
            run.wait_for(point)
        run.kill()
        if out.exists():  # it published before the random moment: then the output is complete and correct
            assert point == "random", f"seed {seed}: killed at {point}, yet {out} exists"
            assert_same_output(out, refs[ref_key])
            shutil.rmtree(out)
    left = [n for n in hidden(tmp_path, "out") if ".partial-" in n]
    recover = runs[3]
    recover.go("ready")
    assert recover.finish() == 0, recover.stderr()
    for name in left:
        assert f"removed {tmp_path / name}: the staging folder of a run" in recover.stderr(), (seed, name)
    assert_same_output(out, refs[ref_key])
    assert hidden(tmp_path, "out") == []

    between = runs[4]  # --overwrite, killed with the previous output renamed aside and the new one not in place
    between.go("ready")
    between.wait_for("between-renames")
    between.kill()
    assert not out.exists()  # only under hidden names: the previous output, the staged one (and the lock file)
    assert [n.split("-")[0] for n in hidden(tmp_path, "out")] == [".out.lock", ".out.old", ".out.partial"]
    published = runs[5]  # the next run restores the previous output, then replaces it; killed before cleaning up
    published.go("ready")
    published.wait_for("published")
    published.kill()
    assert "restored" in published.stderr() and f"{out} from .out.old-" in published.stderr()
    assert_same_output(out, refs[ref_key])
    assert [n.split("-")[0] for n in hidden(tmp_path, "out")] == [".out.lock", ".out.old"]  # not deleted yet
    last = runs[6]
    last.go("ready")
    assert last.finish() != 0  # no --overwrite: it cleans up, then refuses the existing output
    assert "the output a run" in last.stderr() and "replaced before it was killed" in last.stderr()
    assert "exists and is not empty" in last.stderr()
    assert hidden(tmp_path, "out") == []
    assert_same_output(out, refs[ref_key])


def test_two_jobs_on_one_output_the_second_is_refused(refs, tmp_path):
    out = tmp_path / "meg"
    first = Run(tmp_path, ["hf-to-megatron", refs["src"], out, "--tp", "2"], "begun", "first")
    first.wait_for("begun")  # holds the output lock, writing
    line = cli_refuses(["hf-to-megatron", refs["src"], out, "--tp", "2"], "another hetero-convert job (pid "
                       f"{first.proc.pid} on ", ") is writing this output now; refused", in_process=False)
    assert str(out) in line
    first.go("begun")
    assert first.finish() == 0, first.stderr()
    assert_same_output(out, refs["meg"])
    assert hidden(tmp_path, "meg") == []


# ---- a full disk --------------------------------------------------------------------------------------------------


def limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # writes beyond fail as on a full disk


def test_memory_running_out_while_writing_is_not_blamed_on_the_disk(tmp_path):
    """torch's allocator raises a RuntimeError, which the DCP writer catches beside torch.save's own errors: the
    line names the file and entry, says memory ran out and what to do, and does not send the user to free disk
    space. An ENOSPC is still a full disk, and the CLI words an allocation failure the same way, not as a bug."""
    import errno

    from hetero_convert.cli.failures import describe
    from hetero_convert.io.dcp import write_failure

    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as e:
        alloc = e
    file = tmp_path / "__0_0.distcp"
    line = write_failure(file, "decoder.layers.0.mlp.linear_fc1.weight", alloc)
    assert line.startswith(f"{file}: writing 'decoder.layers.0.mlp.linear_fc1.weight' failed: out of memory")
    assert "fewer --workers" in line and "disk" not in line and "bytes free" not in line
    full = write_failure(file, "embedding.word_embeddings.weight", OSError(errno.ENOSPC, "No space left on device"))
    assert "No space left on device" in full and "bytes free there): a full disk or quota?" in full
    for e in (alloc, MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")):
        message, bug = describe(e)
        assert message.startswith(f"out of memory ({type(e).__name__}") and "fewer --workers" in message, message
        assert not bug
    assert describe(MemoryError())[0] == "out of memory (MemoryError): fewer --workers, or a machine with more memory"


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_a_full_disk_is_one_line_naming_the_file(refs, tmp_path, direction):
    """torch.save on a full disk says only "[enforce fail at inline_container.cc:...] unexpected pos"; the
    safetensors writer gets EFBIG/ENOSPC. Either way: one line naming the file, nothing left behind."""
    options, src_key, _ = DIRECTIONS[direction]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HETERO_CONVERT_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "hetero_convert.cli", direction, str(refs[src_key]), str(out),
                        *options], capture_output=True, text=True, env=env, preexec_fn=limit_file_size, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    if direction == "hf-to-megatron":
        assert f"/.out.partial-{Owner.me().host}-" in lines[0] and ".distcp: writing 'decoder." in lines[0]
        assert "failed (ConversionError" not in lines[0] and "unexpected pos" in lines[0]
        assert "bytes free there): a full disk or quota?" in lines[0]
    else:
        assert "/.out.partial-" in lines[0] and ".safetensors: [Errno 27] File too large" in lines[0]
        assert "writing 'model." in lines[0]
    assert not out.exists() and hidden(tmp_path, "out") == []
