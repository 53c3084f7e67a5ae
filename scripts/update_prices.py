"""Regenerate budget_server/pricing/prices.json, the price table budgetd ships, from LiteLLM.

    .venv/bin/pip download litellm --no-deps -d /tmp/litellm_dl
    .venv/bin/python scripts/update_prices.py /tmp/litellm_dl/litellm-*.whl

The source is LiteLLM's wheel (which bundles model_prices_and_context_window_backup.json)
or that JSON file itself. The wheel is read as a zip: importing litellm is slow and heavy,
and budgetd does not depend on it. The conversion is budget_server.pricing.litellm's, the
same code ImportPrices runs, so a shipped price and an imported one cannot differ.

Entries whose prices are not exact in nano-dollars per million tokens are left out and
listed on stderr and in the file's `refused` header; nothing is rounded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import zipfile
from pathlib import Path

from budget_server.pricing.litellm import Conversion, PriceFileError, dump_shipped, parse

ROOT = Path(__file__).resolve().parent.parent
OUT_DEFAULT = ROOT / "budget_server" / "pricing" / "prices.json"
WHEEL_MEMBER = "litellm/model_prices_and_context_window_backup.json"
# Reproducible wheels stamp every member 1980-01-01: that is no date of the prices.
_ZIP_EPOCH = (1980, 1, 1)
_VERSION = re.compile(r"^Version:\s*(\S+)\s*$", re.MULTILINE)


def read_wheel(path: Path) -> tuple[bytes, str, str | None]:
    """The price file in a litellm wheel, the wheel's version, and the file's date if known."""
    with zipfile.ZipFile(path) as wheel:
        info = wheel.getinfo(WHEEL_MEMBER)
        raw = wheel.read(info)
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        match = _VERSION.search(wheel.read(metadata).decode("utf-8", "replace"))
    version = match.group(1) if match else "unknown"
    stamp = info.date_time
    date = None if stamp[:3] <= _ZIP_EPOCH else dt.date(*stamp[:3]).isoformat()
    return raw, version, date


def header(version: str, member: str, file_date: str | None, today: str) -> dict[str, object]:
    return {
        # What each seeded row records as its source: the proto's "litellm 1.80.0 (2026-11-20)".
        "source": f"litellm {version} ({file_date or today})",
        "litellm_version": version,
        "litellm_file": member,
        "file_date": file_date,
        "converted_on": today,
        "generated_by": "scripts/update_prices.py",
    }


def report(conversion: Conversion, out: Path, size: int) -> None:
    print(
        f"wrote {out} ({size:,} bytes): {len(conversion.prices):,} models, "
        f"{conversion.skipped:,} entries skipped (not chat models with per-token prices), "
        f"{len(conversion.refused):,} refused",
        file=sys.stderr,
    )
    for model, why in sorted(conversion.refused.items()):
        print(f"  refused {model}: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a litellm wheel (.whl) or its price JSON")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help="default: %(default)s")
    parser.add_argument(
        "--litellm-version", help="for a JSON source: the litellm version it came from"
    )
    parser.add_argument(
        "--file-date", help="for a JSON source: the date of its prices (YYYY-MM-DD)"
    )
    args = parser.parse_args(argv)
    source: Path = args.source
    if source.suffix == ".whl":
        raw, version, file_date = read_wheel(source)
        member = WHEEL_MEMBER
    else:
        raw = source.read_bytes()
        version, file_date, member = args.litellm_version or "unknown", None, source.name
    if args.litellm_version:
        version = args.litellm_version
    if args.file_date:
        file_date = dt.date.fromisoformat(args.file_date).isoformat()
    try:
        conversion = parse(raw)
    except PriceFileError as error:
        print(f"update_prices: {source}: {error}", file=sys.stderr)
        return 2
    today = dt.datetime.now(dt.UTC).date().isoformat()
    text = dump_shipped(conversion, header(version, member, file_date, today))
    args.out.write_text(text, encoding="utf-8")
    report(conversion, args.out, len(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
