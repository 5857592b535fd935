"""Issue 21: `index build` over a folder holding a FIFO and a file whose name is not valid UTF-8.

Before, the FIFO blocked the build forever and the name stopped it with UnicodeEncodeError (exit 1).
Both are now skipped with a counted warning, and every real image is indexed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from pydicom.data import get_testdata_file


def test_build_skips_fifos_and_undecodable_names(tmp_path, retrieval_siglip):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), data / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), data / "mr.dcm")
    os.mkfifo(data / "pipe.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), os.path.join(os.fsencode(data), b"caf\xe9.dcm"))
    command = [sys.executable, "-m", "medgem.cli", "index", "build", str(data), "--out", str(tmp_path / "idx"),
               "--model", str(retrieval_siglip)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "1 non-regular file(s) (pipes, sockets, devices) skipped" in done.stderr
    assert "1 file(s) whose path is not valid UTF-8 skipped" in done.stderr
    assert "internal error" not in done.stderr
    info = subprocess.run([sys.executable, "-m", "medgem.cli", "index", "info", str(tmp_path / "idx")],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "2" in info.stdout, info.stdout
