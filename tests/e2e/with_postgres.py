"""Runs a command with a throwaway PostgreSQL cluster (TLS on) for it.

    with_postgres.py -- cargo test -p countersign-approval

The command sees COUNTERSIGN_TEST_POSTGRES_URL (the server, plain text; each
test creates its own database in it) and COUNTERSIGN_TEST_POSTGRES_CA (the
CA that signed the server's certificate, for the TLS tests). The cluster is
stopped, by PID, when the command ends; its exit status is this script's.
"""
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from stack import Postgres  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    pg = Postgres(tls=True).start()
    try:
        env = dict(os.environ,
                   COUNTERSIGN_TEST_POSTGRES_URL=f"postgresql://postgres@127.0.0.1:{pg.port}?sslmode=disable",
                   COUNTERSIGN_TEST_POSTGRES_CA=str(pg.ca_file))
        return subprocess.run(args, env=env).returncode
    finally:
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())
