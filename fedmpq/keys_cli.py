"""``fedmpq keys``: enroll devices by generating one signing key each."""

from __future__ import annotations

from pathlib import Path

from fedmpq.cli_common import make_parser
from fedmpq.wire.signing import generate_keys, write_keyring


def main(argv: list[str] | None = None) -> int:
    p = make_parser("fedmpq keys", __doc__)
    p.add_argument("--out", type=Path, required=True, help="key file to write (mode 600)")
    p.add_argument("ids", nargs="*", help="device ids")
    p.add_argument("--count", type=int, default=0, help="also enroll PREFIX-0000..PREFIX-(N-1)")
    p.add_argument("--id-prefix", default="device")
    args = p.parse_args(argv)
    ids = list(args.ids) + [f"{args.id_prefix}-{i:04d}" for i in range(args.count)]
    if not ids:
        p.error("name device ids or give --count")
    write_keyring(args.out, generate_keys(ids))
    print(f"wrote {len(ids)} device keys to {args.out}; give each device its own line only")
    return 0
