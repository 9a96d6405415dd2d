"""``fedmpq keys``: enroll devices and the coordinator in one go.

Writes the coordinator's key file (every device's HMAC key, the coordinator's Ed25519 key
pair) and, with ``--device-dir``, one file per device: its own key and the coordinator's
public key, which is all a device may hold.
"""

from __future__ import annotations

from pathlib import Path

from fedmpq.cli_common import make_parser
from fedmpq.wire.signing import write_key_files


def main(argv: list[str] | None = None) -> int:
    p = make_parser("fedmpq keys", __doc__)
    p.add_argument("--out", type=Path, required=True, help="coordinator's key file (mode 600)")
    p.add_argument("ids", nargs="*", help="device ids")
    p.add_argument("--count", type=int, default=0, help="also enroll PREFIX-0000..PREFIX-(N-1)")
    p.add_argument("--id-prefix", default="device")
    p.add_argument(
        "--device-dir", type=Path, help="also write DIR/<id>.toml for each device (mode 600)"
    )
    args = p.parse_args(argv)
    ids = list(args.ids) + [f"{args.id_prefix}-{i:04d}" for i in range(args.count)]
    if not ids:
        p.error("name device ids or give --count")
    write_key_files(args.out, ids, args.device_dir)
    where = f"; one file per device in {args.device_dir}" if args.device_dir else ""
    print(f"wrote {len(ids)} device keys and the coordinator's key pair to {args.out}{where}")
    return 0
