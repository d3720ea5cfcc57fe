"""Hostile container submissions of issue 10: each class is refused, bounded or ignored, and nothing is left.

The images are tiny layers on xares/encoder-base built from tests/resources/hostile_docker/<case>/ (the
build context is tests/resources, for the shared containers/_contract.py). `TestImageArchive` needs no
engine: it checks the archive verification on hand-made ``docker save`` layouts.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from dataclasses import replace
from pathlib import Path

import docker.errors
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import built_images, docker_ids

from evaluator.cli import eval_cli
from evaluator.errors import SandboxError, SandboxTimeout, SubmissionError
from evaluator.sandbox import docker_image, docker_runtime
from evaluator.sandbox.base import Limits
from evaluator.sandbox.docker_cleanup import RUN_LABEL, Owner, image_ref, parse_image_ref
from evaluator.sandbox.docker_image import scratch_paths, verify_image_archive
from evaluator.sandbox.docker_runtime import ContainerRuntime
from evaluator.sandbox.seccomp import DENIED, profile

RESOURCES = Path(__file__).parent / "resources"
BASE = docker_runtime.KEEPER_IMAGE
LIMITS = Limits(memory_mb=256, cpus=1.0, pids=64, wall_seconds=60, output_mb=16, tmpfs_mb=16, log_bytes=64 << 10)
ONE_CLIP = [np.zeros(16000, np.float32)]


@pytest.fixture(scope="module")
def images(docker_client, docker_archives):
    """case name -> image id, built from tests/resources/hostile_docker/<case>/Dockerfile."""
    with built_images(docker_client, docker_archives, RESOURCES, RESOURCES / "hostile_docker",
                      "xares-test/hostile-") as ids:
        yield ids


def _log_json(log: str, key: str) -> dict:
    line = next((x for x in log.splitlines() if x.startswith(key + " ")), None)
    assert line, f"no {key} line in the encoder's log: {log[-500:]}"
    return json.loads(line[len(key) + 1:])


@pytest.fixture
def attrs_of_encoder(monkeypatch):
    """The engine's view (docker inspect) of every encoder container the test starts."""
    seen = []
    real = ContainerRuntime._verify

    def spy(self, attrs, flags):
        seen.append(attrs)
        return real(self, attrs, flags)

    monkeypatch.setattr(ContainerRuntime, "_verify", spy)
    return seen


# --------------------------------------------------------------------------------------------------


@pytest.mark.docker
class TestImageConfig:
    def test_volumes_become_capped_tmpfs_and_no_engine_volume(self, images, tmp_path, sandbox, make_submission,
                                                              attrs_of_encoder):
        manifest = make_submission(tmp_path / "sub", images["volume"])
        with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt:
            (out,) = rt.encode(ONE_CLIP)
            report = _log_json(rt.last_log, "VOLUME")
        assert out.shape == (50, 8)
        assert report["fstype"] == "tmpfs" and report["error"] == "No space left on device", report
        assert report["written_mib"] <= LIMITS.tmpfs_mb, report
        assert not report["model_visible"]  # the image's files under a VOLUME are hidden by the tmpfs
        (attrs,) = attrs_of_encoder
        assert {m["Destination"] for m in attrs["Mounts"]} == {"/input", "/output"}  # no anonymous volume
        assert set(attrs["HostConfig"]["Tmpfs"]) == {"/tmp", "/scratch", "/opt/data"}

    def test_files_hidden_by_a_volume_are_named_in_the_failure(self, images, tmp_path, sandbox, make_submission):
        entry = {"image": "image.tar", "image_id": images["volume"], "entrypoint": ["python3", "/opt/needs_model.py"]}
        manifest = make_submission(tmp_path / "sub", images["volume"], container=entry)
        with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt, pytest.raises(SandboxError) as err:
            rt.encode(ONE_CLIP)
        assert "No such file or directory: '/opt/data/model.bin'" in str(err.value)
        assert "declares VOLUME /opt/data, /scratch" in err.value.reasons[0]

    def test_healthcheck_stopsignal_user_expose_are_ignored(self, images, tmp_path, sandbox, make_submission,
                                                            attrs_of_encoder):
        manifest = make_submission(tmp_path / "sub", images["runtime_config"])
        with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt:
            (out,) = rt.encode(ONE_CLIP)  # a healthcheck run would leave /output/healthcheck.txt: refused
            report = _log_json(rt.last_log, "CONFIG")
        assert out.shape == (50, 8)
        assert report == {"uid": 65534, "cwd": "/opt"}  # USER ignored, WORKDIR kept
        (attrs,) = attrs_of_encoder
        assert attrs["Config"]["Healthcheck"]["Test"] == ["NONE"]
        assert attrs["Config"]["StopSignal"] == "SIGKILL"
        assert attrs["HostConfig"]["NetworkMode"] == "none" and not attrs["HostConfig"]["PortBindings"]
        assert "Health" not in attrs["State"] or attrs["State"]["Health"]["Status"] != "healthy"


class TestImageConfigRules:  # no engine needed
    def test_volume_paths_are_normalized_and_ours_skipped(self):
        config = {"Volumes": {"/data/": {}, "//cache": {}, "/tmp": {}, "/output": {}, "/input": {}}}
        assert scratch_paths(config) == ("/cache", "/data")

    @pytest.mark.parametrize("path", ["/input/x", "/output/more", "/proc", "/sys/fs", "/dev/shm", "/", "rel",
                                      "/a b", "/x,size=9g"])
    def test_uncoverable_volume_is_refused_with_one_line(self, path):
        with pytest.raises(SubmissionError, match="VOLUME .*remove that VOLUME line"):
            scratch_paths({"Volumes": {path: {}}})

    def test_too_many_volumes_and_our_labels_are_refused(self):
        with pytest.raises(SubmissionError, match="declares 17 VOLUMEs"):
            scratch_paths({"Volumes": {f"/v{i}": {} for i in range(17)}})
        with pytest.raises(SubmissionError, match="org.xares-eval.owner"):
            scratch_paths({"Labels": {"org.xares-eval.owner": "0" * 12 + "-1-1"}})


# --------------------------------------------------------------------------------------------------


class TestSeccompProfile:  # no engine needed
    def test_profile_denies_the_calls_an_encoder_never_needs(self):
        p = profile()
        assert p["defaultAction"] == "SCMP_ACT_ALLOW" and "architectures" not in p  # native ABI only
        denied = set(p["syscalls"][0]["names"])
        for name in ("ptrace", "process_vm_readv", "process_vm_writev", "kexec_load", "bpf", "perf_event_open",
                     "keyctl", "add_key", "request_key", "userfaultfd", "mount", "unshare", "setns", "personality"):
            assert name in denied, name
        assert denied == {n for names in DENIED.values() for n in names}


@pytest.mark.docker
def test_ptrace_and_friends_fail_with_eperm(images, tmp_path, sandbox, make_submission):
    manifest = make_submission(tmp_path / "sub", images["syscalls"])
    with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt:
        rt.encode(ONE_CLIP)
        results = _log_json(rt.last_log, "SYSCALLS")
    assert results.pop("subprocess") == "works"
    i386 = results.pop("i386_abi")
    assert i386 in ("SIGSYS", "n/a"), i386  # another ABI's numbers cannot bypass the list
    assert results == dict.fromkeys(results, "EPERM"), results


# --------------------------------------------------------------------------------------------------


@pytest.mark.docker
class TestDeadlines:
    @pytest.mark.slow
    def test_frozen_container_is_killed_at_the_wall_limit(self, images, tmp_path, sandbox, make_submission):
        manifest = make_submission(tmp_path / "sub", images["frozen"])
        with sandbox.open(tmp_path / "sub", manifest, replace(LIMITS, wall_seconds=3)) as rt:
            start = time.monotonic()
            with pytest.raises(SandboxTimeout, match="did not finish within 3 s .*last log line: request read"):
                rt.encode(ONE_CLIP)
            elapsed = time.monotonic() - start
        assert elapsed < 3 + 20, f"{elapsed:.1f} s for a 3 s limit"

    def test_engine_calls_have_a_timeout(self, images, tmp_path, sandbox, make_submission):
        manifest = make_submission(tmp_path / "sub", images["frozen"])
        with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt:
            assert rt._client.api.timeout == docker_runtime.CONTROL_TIMEOUT_S

    def test_output_is_collected_only_after_the_whole_container_is_gone(self, images, tmp_path, sandbox,
                                                                        make_submission, docker_client,
                                                                        monkeypatch):
        """A daemon writes to /output once the main process has exited. Whatever it managed before the
        kernel killed it is part of the answer; nothing can change /output while it is read."""
        encoders_at_copy = []
        real_copy_out = docker_runtime.copy_out

        def spy(container, **kwargs):
            labels = [f"{RUN_LABEL}={sandbox.run_ids[-1]}", "org.xares-eval.role=encoder"]
            encoders_at_copy.append(docker_client.api.containers(all=True, filters={"label": labels}))
            return real_copy_out(container, **kwargs)

        monkeypatch.setattr(docker_runtime, "copy_out", spy)
        manifest = make_submission(tmp_path / "sub", images["late_writer"])
        with sandbox.open(tmp_path / "sub", manifest, LIMITS) as rt:
            try:
                outs = rt.encode([np.zeros(16000, np.float32), np.zeros(8000, np.float32)])
            except SandboxError as e:  # the daemon wrote before the kernel killed it: a consistent refusal
                assert re.search(r"unexpected file\(s\) in /output: late_|NaN", str(e)), e
            else:
                assert [o.shape for o in outs] == [(50, 8), (25, 8)]
                assert all(np.all(o == 0.5) for o in outs)
        assert encoders_at_copy == [[]], "the encoder's container still existed when /output was read"


# --------------------------------------------------------------------------------------------------


def _rewrite_archive(src: Path, dest: Path, *, drop=(), replace_member: dict | None = None) -> None:
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for member in tin.getmembers():
            if member.name in drop:
                continue
            data = (replace_member or {}).get(member.name)
            if data is not None:
                member = tarfile.TarInfo(member.name)
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
            else:
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)


@pytest.mark.docker
class TestBorrowedImage:
    def test_archive_without_layers_of_an_image_on_the_engine_is_refused(self, images, tmp_path, docker_client,
                                                                        make_submission):
        image_id = images["frozen"]
        manifest = make_submission(tmp_path / "full", image_id)
        layers = json.loads(tarfile.open(tmp_path / "full" / "image.tar").extractfile("manifest.json").read())[0]
        (tmp_path / "sub").mkdir()
        (tmp_path / "full" / "manifest.json").unlink(missing_ok=True)
        _rewrite_archive(tmp_path / "full" / "image.tar", tmp_path / "sub" / "image.tar", drop=layers["Layers"])
        assert docker_client.images.get(image_id)  # the engine holds every layer: docker load alone would pass
        with pytest.raises(SubmissionError, match=r"image.tar does not carry layer 1 of \d .*relying on what the "
                                                  "Docker engine already has"):
            ContainerRuntime(tmp_path / "sub", manifest, LIMITS)

    def test_archive_with_another_layer_is_refused(self, images, tmp_path, make_submission):
        manifest = make_submission(tmp_path / "full", images["frozen"])
        top = json.loads(tarfile.open(tmp_path / "full" / "image.tar").extractfile("manifest.json").read())[0]
        (tmp_path / "sub").mkdir()
        _rewrite_archive(tmp_path / "full" / "image.tar", tmp_path / "sub" / "image.tar",
                         replace_member={top["Layers"][-1]: _tar_bytes({"opt/encoder.py": b"print('other')"})})
        with pytest.raises(SubmissionError, match=r"layer \d of \d .* hashes to sha256:"):
            ContainerRuntime(tmp_path / "sub", manifest, LIMITS)


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _save_layout(path: Path, layers: list[bytes], *, oci: bool, gzip_layers: bool = False, link_dup: bool = False,
                 skip_config: bool = False, entry_extra: dict | None = None) -> str:
    """A hand-made `docker save` archive; returns its image id."""
    diff_ids = [f"sha256:{hashlib.sha256(b).hexdigest()}" for b in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cid = hashlib.sha256(config).hexdigest()
    files, links, paths = {}, {}, []
    for i, layer in enumerate(layers):
        blob = gzip.compress(layer) if gzip_layers else layer
        digest = hashlib.sha256(blob).hexdigest()
        name = f"blobs/sha256/{digest}" if oci else f"{i:064x}/layer.tar"
        if link_dup and layer in layers[:i]:
            links[name] = paths[layers.index(layer)]
        else:
            files[name] = blob
        paths.append(name)
    config_name = f"blobs/sha256/{cid}" if oci else f"{cid}.json"
    if not skip_config:
        files[config_name] = config
    entry = {"Config": config_name, "RepoTags": None, "Layers": paths, **(entry_extra or {})}
    files["manifest.json"] = json.dumps([entry]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():  # docker save links a repeated layer to its first copy
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, os.path.relpath(target, os.path.dirname(name))
            tar.addfile(info)
    return f"sha256:{cid}"


class TestImageArchive:  # no engine needed
    LAYERS = [_tar_bytes({"a": b"1"}), _tar_bytes({"b": b"2"}), _tar_bytes({"a": b"1"})]

    @pytest.mark.parametrize("oci,gz,link", [(False, False, False), (True, False, False), (False, True, False),
                                             (False, False, True), (True, True, False)],
                             ids=["legacy", "oci", "gzip-layers", "linked-duplicate", "oci-gzip"])
    def test_complete_archives_verify(self, tmp_path, oci, gz, link):
        image_id = _save_layout(tmp_path / "i.tar", self.LAYERS, oci=oci, gzip_layers=gz, link_dup=link)
        archive = verify_image_archive(tmp_path / "i.tar")
        assert archive.image_id == image_id and len(archive.layers) == 3
        assert archive.uncompressed_bytes == sum(len(x) for x in self.LAYERS)

    @pytest.mark.parametrize("kwargs,reason", [
        ({"skip_config": True}, r"does not carry the image config"),
        ({"entry_extra": {"Parent": "sha256:" + "0" * 64}}, r"names a parent image"),
        ({"entry_extra": {"RepoTags": ["evil:latest"]}}, r"carries tags"),
        ({"entry_extra": {"Layers": []}}, r"lists 0 layer\(s\) but the image config needs 3"),
        ({"entry_extra": {"Layers": ["/etc/passwd"] * 3}}, r"outside the archive"),
    ], ids=["no-config", "parent", "tagged", "layer-count", "absolute-path"])
    def test_incomplete_archives_are_refused(self, tmp_path, kwargs, reason):
        _save_layout(tmp_path / "i.tar", self.LAYERS, oci=False, **kwargs)
        with pytest.raises(SubmissionError, match=reason):
            verify_image_archive(tmp_path / "i.tar")

    def test_hostile_tar_structure_is_refused_before_tarfile_reads_it(self, tmp_path, monkeypatch):
        _save_layout(tmp_path / "i.tar", self.LAYERS, oci=False)
        (tmp_path / "i.tar.gz").write_bytes(gzip.compress((tmp_path / "i.tar").read_bytes()))
        with pytest.raises(SubmissionError, match="not a plain tar archive"):
            verify_image_archive(tmp_path / "i.tar.gz")
        with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("manifest.json")
            info.pax_headers = {"comment": "x" * (2 << 20)}  # tarfile would read it whole into memory
            tar.addfile(info, io.BytesIO())
        with pytest.raises(SubmissionError, match="metadata header"):
            verify_image_archive(tmp_path / "pax.tar")
        monkeypatch.setattr(docker_image, "MAX_MEMBERS", 4)
        with pytest.raises(SubmissionError, match="more than 4 entries"):
            verify_image_archive(tmp_path / "i.tar")

    def test_uncompressed_size_is_capped(self, tmp_path):
        _save_layout(tmp_path / "i.tar", [b"\0" * 100_000], oci=False, gzip_layers=True)
        with pytest.raises(SubmissionError, match="over .* GiB uncompressed"):
            verify_image_archive(tmp_path / "i.tar", max_bytes=50_000)


# --------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from evaluator.sandbox.base import Limits
    from evaluator.sandbox.docker_runtime import ContainerRuntime
    from evaluator.submission.manifest import Manifest

    root = Path(sys.argv[1])
    manifest = Manifest.from_dict(json.loads((root / "manifest.json").read_text()))
    rt = ContainerRuntime(root, manifest, Limits(memory_mb=128, wall_seconds=300), run_id=sys.argv[2])
    rt.encode([np.zeros(16000, np.float32)])  # the frozen encoder never answers
""")


def _engine_objects(client, run_id: str) -> list[str]:
    label = f"{RUN_LABEL}={run_id}"
    tags = [t for image in client.api.images() for t in image.get("RepoTags") or [] if t.endswith(f".{run_id}")]
    return sorted(docker_ids(client, label=label)) + sorted(docker_ids(client, label=label, volumes=True)) + tags


@pytest.mark.docker
@pytest.mark.slow
def test_hard_killed_evaluator_leaves_nothing_after_the_next_start_or_cleanup(
        images, docker_client, tmp_path, sandbox, make_submission):
    """Two evaluator processes run a frozen encoder; A is SIGKILLed: the next start removes A's objects,
    `xares-eval cleanup` keeps B's while B lives and removes them once B is killed too."""
    root = tmp_path / "sub"
    manifest = make_submission(root, images["frozen"])
    (root / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    (tmp_path / "child.py").write_text(CHILD)
    runs = {name: f"test-kill-{name}-{uuid.uuid4().hex[:8]}" for name in ("a", "b")}
    procs = {name: subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(root), rid],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, rid in runs.items()}
    try:
        deadline = time.monotonic() + 120
        while not all(len(_engine_objects(docker_client, rid)) >= 4 for rid in runs.values()):  # 2 ctr, vol, tag
            for name, p in procs.items():
                assert p.poll() is None, f"child {name} died: {p.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the children did not start their encoders"
            time.sleep(0.5)
        left_by_a = _engine_objects(docker_client, runs["a"])
        procs["a"].send_signal(signal.SIGKILL)
        procs["a"].wait(timeout=30)

        # Another process starting a runtime on a shared engine may clean up after A at any moment:
        # A's objects are then gone, never half-listed as live.
        dry = CliRunner().invoke(eval_cli, ["cleanup", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert f"run {runs['a']}" in dry.output or not _engine_objects(docker_client, runs["a"]), dry.output
        assert f"run {runs['a']}, pid {procs['a'].pid}, live" not in dry.output
        assert f"run {runs['b']}, pid {procs['b'].pid}, live" in dry.output
        assert set(_engine_objects(docker_client, runs["a"])) <= set(left_by_a)  # a dry run removes nothing

        with sandbox.open(root, manifest, LIMITS):  # the next start cleans up after A
            pass
        assert _engine_objects(docker_client, runs["a"]) == []
        assert len(_engine_objects(docker_client, runs["b"])) >= 4  # B is alive: untouched

        everything = CliRunner().invoke(eval_cli, ["cleanup", "--all", "--dry-run"])
        assert "would remove container" in everything.output and f"run {runs['b']}" in everything.output
        procs["b"].send_signal(signal.SIGKILL)
        procs["b"].wait(timeout=30)
        left_by_b = _engine_objects(docker_client, runs["b"])
        done = CliRunner().invoke(eval_cli, ["cleanup"])
        assert done.exit_code == 0, done.output
        assert _engine_objects(docker_client, runs["b"]) == []
        if left_by_b:  # not already cleaned by another process
            assert "removed " in done.output and runs["b"] in done.output, done.output
        assert docker_client.images.get(images["frozen"])  # the image keeps its other tag
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for rid in runs.values():  # whatever a failed assertion left: ours, owners dead by now
            for cid in docker_ids(docker_client, label=f"{RUN_LABEL}={rid}"):
                with contextlib.suppress(docker.errors.APIError):
                    docker_client.api.remove_container(cid, force=True, v=True)


class TestOwner:  # no engine needed
    def test_this_process_is_live_and_a_gone_pid_is_dead(self):
        me = Owner.current()
        assert me.state() == "live"
        assert Owner.parse(me.token) == me
        assert Owner(me.host, me.pid, me.start + 1).state() == "dead"  # a recycled pid
        assert Owner("0" * 12, me.pid, me.start).state() == "unknown"  # another host: never ours to judge

    def test_image_ref_round_trips(self):
        ref = image_ref("sha256:" + "ab" * 32, "run/with:odd chars")
        owner, run = parse_image_ref(ref)
        assert ref.startswith("xares-eval/sub-abababababab:") and owner == Owner.current()
        assert run == "run_with_odd_chars"
        assert parse_image_ref("xares-test/hostile:latest") is None
