"""Writes that fail for real, for tests/test_ownership.py. Run inside a private user + mount namespace
(`unshare -Urm python tests/tmpfs_driver.py SPEC.json RESULT.json`), where it may mount a small tmpfs that
no one else sees:

    full   copies of the folders on a 16 MiB tmpfs, filled up to the last few KiB
    ro     the same tmpfs remounted read-only
    noperm every folder on it made read-only by its mode, commands run without capabilities (root is denied)

then runs each command of SPEC (an mlmtrain argument list, "{M}" standing for the mount) and records its exit
code, output, the folder it names before and after, and any temporary file left on the tmpfs. The tmpfs
vanishes with the namespace, hence the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cli_run import run_cli, snapshot

NO_PRIVILEGES = ("setpriv", "--securebits", "+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
                 "--bounding-set", "-all", "--inh-caps", "-all")  # fmt: skip


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mount = Path(spec["mount"])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    for name, source in spec["copies"].items():
        shutil.copytree(source, mount / name, symlinks=True)
    results = {}
    for mode in ("full", "ro", "noperm"):
        filler = mount / "filler"
        if mode == "full":
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - (16 << 10)))
        elif mode == "ro":
            filler.unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
            for folder in [mount, *(p for p in mount.rglob("*") if p.is_dir())]:
                os.chmod(folder, 0o555)
        for case, (target, args) in spec["commands"].items():
            folder = mount / target
            before = snapshot(folder)
            done = run_cli(
                *(a.replace("{M}", str(mount)) for a in args), prefix=NO_PRIVILEGES if mode == "noperm" else ()
            )
            results[f"{mode}/{case}"] = {
                "rc": done.returncode,
                "stdout": done.stdout,
                "stderr": done.stderr,
                "unchanged": snapshot(folder) == before,
                "temporary": sorted(str(p) for p in mount.rglob(".tmp_*")),
            }
    Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
