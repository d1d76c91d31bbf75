"""Container health check: exit 0 when the server's /readyz answers 200 (ready or degraded), 1 otherwise.

    python -m fewstep.server.healthcheck [URL]        # default http://127.0.0.1:$FEWSTEP_PORT/readyz

The Dockerfile's HEALTHCHECK runs this: the image needs no curl, and a refused connection or a 503 is one
line on stdout, not a traceback.
"""

from __future__ import annotations

import os
import sys

import httpx


def check(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        return False, f"{url}: {type(e).__name__}: {e}"
    return r.status_code == 200, f"{url}: {r.status_code} {r.text.strip()[:200]}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    url = argv[0] if argv else f"http://127.0.0.1:{os.environ.get('FEWSTEP_PORT', '8000')}/readyz"
    ok, line = check(url)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
