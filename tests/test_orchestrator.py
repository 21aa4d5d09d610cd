"""The job-orchestrator client protocol (wire-compat.md section 2) against the built zipapp."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from jobd import cpu
from jobd.counter import CounterError, NumericIds
from tests.conftest import Daemon, make_zip, python39, wait_until

PAYLOAD_KEYS = ["id", "status", "loc", "pid", "killed"]
B = "jobdTestBoundary"


def submit(daemon: Daemon, files: dict[str, bytes | str]) -> httpx.Response:
    return daemon.client.post("/submit", files=[("file", (name, content))
                                                for name, content in files.items()])


def submitted(daemon: Daemon, files: dict[str, bytes | str]) -> dict:
    response = submit(daemon, files)
    assert response.status_code == 200, response.text
    return response.json()


def retrieve(daemon: Daemon, payload_id: int) -> httpx.Response:
    return daemon.client.get(f"/retrieve/{payload_id}")


def status_of(daemon: Daemon, payload_id: int) -> str:
    response = retrieve(daemon, payload_id)
    assert response.status_code == 200
    if response.headers["content-type"] == "application/zip":
        return "Completed"
    return response.json()["status"]


def wait_status(daemon: Daemon, payload_id: int, wanted: str, timeout: float = 30) -> None:
    wait_until(lambda: status_of(daemon, payload_id) == wanted, timeout, 0.05,
               f"payload {payload_id} to be {wanted}")


def zip_files(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def raw_post(daemon: Daemon, path: str, body: bytes, content_type: str) -> httpx.Response:
    return daemon.client.post(path, content=body, headers={"Content-Type": content_type})


def part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{B}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"


CT = f"multipart/form-data; boundary={B}"
CLOSE = f"--{B}--\r\n".encode()


# -- submit and retrieve ----------------------------------------------------------------------


def test_submit_answers_the_payload_record(daemon: Daemon) -> None:
    run = "#!/bin/sh\ntr a-z A-Z < input.pdb > output.pdb\nls > listing.txt\n"
    response = submit(daemon, {"run.sh": run, "input.pdb": "atom 1 ca\n",
                               "a/../../x": "sanitised", "C:\\win\\y.txt": "windows"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    record = response.json()
    assert list(record) == PAYLOAD_KEYS
    assert isinstance(record["id"], int) and record["id"] >= 1
    assert record["status"] == "Prepared"
    assert record["loc"] == str((daemon.datapath / str(record["id"]) / "work").resolve())
    assert record["pid"] == 0 and record["killed"] is False

    wait_status(daemon, record["id"], "Completed")
    result = retrieve(daemon, record["id"])
    assert result.headers["content-type"] == "application/zip"
    files = zip_files(result.content)
    assert files["output.pdb"] == b"ATOM 1 CA\n"
    assert files["x"] == b"sanitised" and files["y.txt"] == b"windows"
    assert files["listing.txt"].split() == [b"input.pdb", b"listing.txt", b"output.pdb",
                                            b"run.sh", b"x", b"y.txt"]
    assert not (daemon.datapath / "x").exists() and not (daemon.workdir / "x").exists()


def test_ids_are_unsigned_integers_never_reused(daemon_factory, tmp_path: Path) -> None:
    workdir = tmp_path / "daemon"
    daemon = daemon_factory(workdir=workdir)
    ids = [submitted(daemon, {"run.sh": "true\n"})["id"] for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for payload_id in ids:
        wait_status(daemon, payload_id, "Completed")
    assert daemon.stop() == 0
    shutil.rmtree(daemon.datapath / str(ids[-1]))  # even with its job gone ...
    (daemon.db_path / "jobs.json").unlink()  # ... and the whole database, no id comes back
    again = daemon_factory(workdir=workdir)
    new = submitted(again, {"run.sh": "true\n"})["id"]
    assert new > ids[-1]
    assert retrieve(again, ids[-1]).json() == {
        "id": ids[-1], "status": "Cleaned",
        "loc": str((again.datapath / str(ids[-1]) / "work").resolve()), "pid": 0,
        "killed": False}


def test_running_then_completed(daemon: Daemon) -> None:
    run = ("#!/bin/sh\necho started > progress.txt\n"
           "while [ ! -e go ]; do sleep 0.05; done\necho finished > final.txt\n")
    record = submitted(daemon, {"run.sh": run})
    loc = Path(record["loc"])
    wait_until(lambda: (loc / "progress.txt").exists(), 30, 0.05, "the job to start")

    running = retrieve(daemon, record["id"])
    assert running.status_code == 200
    assert running.headers["content-type"] == "application/json"
    body = running.json()
    assert list(body) == PAYLOAD_KEYS
    assert body["status"] == "Running" and body["killed"] is False
    assert body["pid"] > 0 and alive(body["pid"])

    partial = daemon.client.get(f"/retrieve_partial/{record['id']}")
    assert partial.status_code == 200
    assert partial.headers["content-type"] == "application/zip"
    files = zip_files(partial.content)
    assert files["progress.txt"] == b"started\n" and "final.txt" not in files

    (loc / "go").touch()
    wait_status(daemon, record["id"], "Completed")
    files = zip_files(retrieve(daemon, record["id"]).content)
    assert files["final.txt"] == b"finished\n" and "go" in files
    after = daemon.client.get(f"/retrieve_partial/{record['id']}")
    assert after.headers["content-type"] == "application/zip"
    assert zip_files(after.content) == files  # the result, once finished


def test_retrieve_partial_of_a_queued_job_is_its_input(daemon_factory) -> None:
    daemon = daemon_factory(JOBD_SLOTS="1")
    blocker = submitted(daemon, {"run.sh": "while [ ! -e go ]; do sleep 0.05; done\n"})
    queued = submitted(daemon, {"run.sh": "true\n", "in.txt": "input"})
    assert status_of(daemon, queued["id"]) == "Prepared"
    partial = daemon.client.get(f"/retrieve_partial/{queued['id']}")
    assert zip_files(partial.content) == {"in.txt": b"input", "run.sh": b"true\n"}
    Path(blocker["loc"], "go").touch()
    wait_status(daemon, queued["id"], "Completed")


def test_failed_job(daemon: Daemon) -> None:
    record = submitted(daemon, {"run.sh": "echo partial > out.txt\nexit 3\n"})
    wait_status(daemon, record["id"], "Failed")
    body = retrieve(daemon, record["id"]).json()
    assert body == {**record, "status": "Failed"}
    files = zip_files(daemon.client.get(f"/retrieve_partial/{record['id']}").content)
    assert files["out.txt"] == b"partial\n"


def test_single_archive_parts_are_unpacked(daemon: Daemon) -> None:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as tf:
        for name, content in {"run.sh": b"cat sub/in.txt > out.txt\n", "sub/in.txt": b"t"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    from_tar = submitted(daemon, {"job.tar.gz": tar.getvalue()})
    from_zip = submitted(daemon, {"job.zip": make_zip({"run.sh": "echo z > out.txt\n"})})
    wait_status(daemon, from_tar["id"], "Completed")
    wait_status(daemon, from_zip["id"], "Completed")
    assert zip_files(retrieve(daemon, from_tar["id"]).content)["out.txt"] == b"t"
    assert zip_files(retrieve(daemon, from_zip["id"]).content)["out.txt"] == b"z\n"


# -- Invalid ----------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [
    {"input.pdb": "no run.sh here"},
    {},
    {"job.zip": make_zip({"run.sh": "true\n", "../escape": "x"})},
    {"job.zip": b"PK\x03\x04 a damaged zip"},
    {"run.sh": "true\n", "..": "dots"},
    {"run.sh": "true\n", "a/x": "1", "b/x": "2"},
])
def test_well_formed_but_unusable_is_invalid(daemon: Daemon,
                                             files: dict[str, str | bytes]) -> None:
    response = submit(daemon, files) if files else raw_post(daemon, "/submit", CLOSE, CT)
    assert response.status_code == 200, response.text
    record = response.json()
    assert list(record) == PAYLOAD_KEYS and record["status"] == "Invalid"
    assert retrieve(daemon, record["id"]).json() == record
    partial = daemon.client.get(f"/retrieve_partial/{record['id']}")
    assert partial.headers["content-type"] == "application/zip"
    assert zip_files(partial.content) == {}
    assert daemon.client.post(f"/kill/{record['id']}").status_code == 200
    assert retrieve(daemon, record["id"]).json()["status"] == "Invalid"
    assert not (daemon.datapath / str(record["id"])).exists()


def test_bad_name_before_a_large_file_still_gets_its_answer(daemon: Daemon) -> None:
    """The rest of the body is read and dropped, so the client sees 200 Invalid, not a reset."""
    response = submit(daemon, {"..": "x", "run.sh": "true\n", "big": os.urandom(8 << 20)})
    assert response.status_code == 200
    assert response.json()["status"] == "Invalid"
    assert daemon.client.get("/health").status_code == 200


# -- 400 for malformed bodies -----------------------------------------------------------------


@pytest.mark.parametrize(("body", "content_type", "message"), [
    (part("file", b"x", "run.sh") + CLOSE, "multipart/form-data", "no boundary"),
    (part("file", b"x", "run.sh") + CLOSE, "application/json", "expected multipart/form-data"),
    ((part("file", b"echo hi\n", "run.sh") + CLOSE)[:-20], CT, "closing boundary"),
    (part("file", b"echo hi\n", "run.sh"), CT, "closing boundary"),
    (part("file", b"true\n", "run.sh")[:30], CT, "closing boundary"),
    (b"", CT, "no multipart boundary"),
    (b"just some bytes", CT, "no multipart boundary"),
    (f"--{B}\r\nno header colon\r\n\r\nx\r\n".encode() + CLOSE, CT, "malformed part header"),
    (f"--{B}junk\r\n".encode() + CLOSE, CT, "unexpected bytes"),
])
def test_malformed_multipart_is_400(daemon: Daemon, body: bytes, content_type: str,
                                    message: str) -> None:
    response = raw_post(daemon, "/submit", body, content_type)
    assert response.status_code == 400
    error = response.json()
    assert list(error) == ["error", "message", "status"]
    assert error["error"] == "bad_request" and error["status"] == 400
    assert message in error["message"]
    assert [p for p in daemon.datapath.iterdir() if not p.name.startswith(".")] == []
    assert list((daemon.datapath / ".incoming").iterdir()) == []
    assert submitted(daemon, {"run.sh": "true\n"})["id"] == 1  # nothing was allocated


def test_hand_built_body_with_curl_style_parts(daemon: Daemon) -> None:
    body = (b"preamble\r\n" + part("file", b"cat data.bin > copy.bin\n", "run.sh")
            + part("file", bytes(range(256)) * 4, "data.bin") + CLOSE)
    record = raw_post(daemon, "/submit", body, CT).json()
    wait_status(daemon, record["id"], "Completed")
    assert zip_files(retrieve(daemon, record["id"]).content)["copy.bin"] == bytes(range(256)) * 4


def test_too_large_is_413(daemon_factory) -> None:
    daemon = daemon_factory(JOBD_MAX_BODY="1K")
    response = submit(daemon, {"run.sh": "true\n", "big": b"x" * 4096})
    assert response.status_code == 413
    assert response.json()["error"] == "request_entity_too_large"


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_curl_example_from_the_readme(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "run.sh").write_text("#!/bin/sh\nwc -c < input.pdb > size.txt\n")
    (tmp_path / "input.pdb").write_text("ATOM      1  CA\n")
    out = subprocess.run(["curl", "-sS", "-F", "file=@run.sh", "-F", "file=@input.pdb",
                          f"{daemon.url}/submit"], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    record = httpx.Response(200, content=out.encode()).json()
    assert record["status"] == "Prepared"
    wait_status(daemon, record["id"], "Completed")
    subprocess.run(["curl", "-sS", "-o", "results.zip", f"{daemon.url}/retrieve/{record['id']}"],
                   cwd=tmp_path, check=True, timeout=60)
    assert zip_files((tmp_path / "results.zip").read_bytes())["size.txt"].strip() == b"16"


def test_upload_streams_to_disk(daemon: Daemon) -> None:
    """48 MiB through /submit: the daemon's peak memory grows by far less than that."""
    pid = daemon.proc.pid  # type: ignore[union-attr]

    def peak_kib() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    submitted(daemon, {"run.sh": "true\n"})  # warm up the code paths first
    before = peak_kib()
    big = os.urandom(1 << 20) * 48
    record = submitted(daemon, {"run.sh": "wc -c < big > size.txt\n", "big": big})
    grown = peak_kib() - before
    assert grown < 16 * 1024, f"peak memory grew by {grown} KiB"
    wait_status(daemon, record["id"], "Completed", timeout=120)


# -- kill -------------------------------------------------------------------------------------


def test_kill_running_job_and_its_children(daemon: Daemon) -> None:
    run = ("#!/bin/sh\nsleep 300 &\necho $! > child.pid\n"
           "sh -c 'trap \"\" TERM; sleep 300' &\necho $! > stubborn.pid\n"
           "echo $$ > main.pid\nwait\n")
    record = submitted(daemon, {"run.sh": run})
    loc = Path(record["loc"])
    wait_until(lambda: (loc / "main.pid").exists(), 30, 0.05, "the job to start")
    pids = [int((loc / f"{n}.pid").read_text()) for n in ("main", "child", "stubborn")]
    assert all(alive(p) for p in pids)

    response = daemon.client.post(f"/kill/{record['id']}", timeout=60)
    assert response.status_code == 200
    assert response.content == b""
    body = retrieve(daemon, record["id"]).json()
    assert body == {**record, "status": "Killed", "killed": True}
    wait_until(lambda: not any(alive(p) for p in pids), 15, 0.05, "every process to be gone")
    files = zip_files(daemon.client.get(f"/retrieve_partial/{record['id']}").content)
    assert "main.pid" in files
    assert daemon.client.post(f"/kill/{record['id']}").status_code == 200  # idempotent


def test_kill_queued_job(daemon_factory) -> None:
    daemon = daemon_factory(JOBD_SLOTS="1")
    blocker = submitted(daemon, {"run.sh": "while [ ! -e go ]; do sleep 0.05; done\n"})
    queued = submitted(daemon, {"run.sh": "echo never > ran.txt\n"})
    assert daemon.client.post(f"/kill/{queued['id']}").status_code == 200
    assert retrieve(daemon, queued["id"]).json()["status"] == "Killed"
    Path(blocker["loc"], "go").touch()
    wait_status(daemon, blocker["id"], "Completed")
    assert status_of(daemon, queued["id"]) == "Killed"


# -- unknown ids, load, root ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/retrieve/999999", "/retrieve/abc", "/retrieve/-1",
                                  "/retrieve/4294967296", "/retrieve/0",
                                  "/retrieve_partial/999999", "/retrieve_partial/x1"])
def test_unknown_is_404(daemon: Daemon, path: str) -> None:
    response = daemon.client.get(path)
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "message": "payload not found",
                               "status": 404}


def test_kill_unknown_is_404(daemon: Daemon) -> None:
    assert daemon.client.post("/kill/999999").status_code == 404
    assert daemon.client.post("/kill/nope").status_code == 404


def test_cleaned_by_retention(daemon_factory) -> None:
    daemon = daemon_factory(JOBD_RETENTION="1s", JOBD_RETENTION_INTERVAL="0.2s")
    record = submitted(daemon, {"run.sh": "true\n"})
    wait_status(daemon, record["id"], "Cleaned")
    assert retrieve(daemon, record["id"]).json() == {**record, "status": "Cleaned"}
    partial = daemon.client.get(f"/retrieve_partial/{record['id']}")
    assert partial.status_code == 200 and zip_files(partial.content) == {}
    assert daemon.client.post(f"/kill/{record['id']}").status_code == 404


def test_numeric_classic_jobs_are_skipped_and_visible(daemon: Daemon) -> None:
    assert daemon.upload("1", {"run.sh": "echo classic > c.txt\n"}).status_code == 201
    record = submitted(daemon, {"run.sh": "true\n"})
    assert record["id"] == 2
    wait_status(daemon, 1, "Completed")
    assert zip_files(retrieve(daemon, 1).content)["c.txt"] == b"classic\n"


def test_load_is_a_bare_number(daemon: Daemon) -> None:
    for _ in range(3):
        response = daemon.client.get("/load")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        value = response.json()
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert 0 <= value <= 100


def test_root_and_health(daemon: Daemon) -> None:
    assert daemon.client.get("/").status_code == 200
    assert daemon.client.get("/health").json() == {"status": "healthy"}


@pytest.mark.skipif(python39() is None, reason="needs CPython 3.9")
def test_protocol_on_python_3_9(daemon_factory) -> None:
    daemon = daemon_factory(interpreter=python39())
    record = submitted(daemon, {"run.sh": "echo 39 > out.txt\n", "a/../in.txt": "x"})
    wait_status(daemon, record["id"], "Completed")
    assert zip_files(retrieve(daemon, record["id"]).content)["out.txt"] == b"39\n"
    assert 0 <= daemon.client.get("/load").json() <= 100
    assert "jobd_jobs" in daemon.client.get("/metrics").text


# -- units: CPU usage and the id counter ------------------------------------------------------


def test_cpu_usage_from_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    before = cpu.read_times(stat)
    assert before == (200, 1000)
    stat.write_text("cpu  250 0 150 900 100 0 0 0 0 0\n")
    after = cpu.read_times(stat)
    assert cpu.usage(before, after) == 50.0  # 200 busy of 400 (iowait counts as idle)
    assert cpu.usage(after, after) is None
    assert cpu.read_times(tmp_path / "missing") is None

    load = cpu.CpuLoad(stat)
    first = asyncio.run(load.percent())
    assert first == 0.0  # nothing changed during the first call's interval
    assert 0 <= asyncio.run(cpu.CpuLoad().percent()) <= 100  # the real /proc/stat


def test_numeric_ids(tmp_path: Path) -> None:
    ids = NumericIds(tmp_path, ["abc", "7", "0042x"], fsync=False)
    assert ids.allocate() == 8
    assert ids.allocate(lambda i: i in {"9", "10"}) == 11
    assert ids.issued(8) and ids.issued(1) and not ids.issued(12) and not ids.issued(0)
    reopened = NumericIds(tmp_path, [], fsync=False)  # the file reserved ids up to 1008
    assert reopened.allocate() == 1009
    assert reopened.issued(11)
    (tmp_path / "numeric-ids").write_text("garbage\n")
    with pytest.raises(CounterError, match="should hold one number"):
        NumericIds(tmp_path, [])
