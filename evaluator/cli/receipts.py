"""``xares-eval keygen`` and ``xares-eval verify``: the organizer's signing key, and checking a signed result.

    xares-eval keygen --out organizer
    xares-eval verify out/mine-0123abcd4567/A-89ef0123abcd/results.json --key organizer.pub
"""

from __future__ import annotations

from pathlib import Path

import click

KEYGEN_EPILOG = """\b
Examples:
  xares-eval keygen                      # organizer.key + organizer.pub here
  xares-eval keygen --out keys/xares26   # keys/xares26.key + keys/xares26.pub
"""

VERIFY_EPILOG = """\b
Examples:
  xares-eval verify out/mine-0123abcd4567/A-89ef0123abcd/results.json --key organizer.pub
  xares-eval verify results.json --key organizer.pub --receipt downloads/receipt.json
"""


@click.command("keygen", epilog=KEYGEN_EPILOG)
@click.option("--out", "prefix", default="organizer", show_default=True,
              help="Path prefix of the pair: PREFIX.key (private) and PREFIX.pub (public).")
def keygen(prefix: str) -> None:
    """Create an ed25519 key pair for signing results receipts.

    The private key (PREFIX.key, mode 0600) signs; keep it secret. The public key (PREFIX.pub) lets anyone
    check a receipt with `xares-eval verify`; publish it. Existing files are never overwritten.
    """
    from evaluator.receipts import generate_keypair, key_id, load_public_key

    private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    generate_keypair(private_path, public_path)
    click.echo(f"wrote {private_path} (private key: keep it secret, never publish or commit it)")
    click.echo(f"wrote {public_path} (public key: publish it, so anyone can verify receipts)")
    click.echo(f"key id: {key_id(load_public_key(public_path))}")


@click.command("verify", epilog=VERIFY_EPILOG)
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The signer's public key (the .pub written by `xares-eval keygen`).")
@click.option("--receipt", "receipt_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The receipt to check.  [default: receipt.json beside RESULTS]")
def verify(results: Path, key_path: Path, receipt_path: Path | None) -> None:
    """Check that RESULTS (a results.json) carries a valid receipt signed with --key.

    The signature must match the receipt's contents, and every score and setting in RESULTS must equal
    what the receipt signed. Exit 0 when all holds; otherwise every problem is listed and the exit code
    is 1 (2 when a file is missing or the key file is not an ed25519 public key).
    """
    from evaluator.receipts import RECEIPT_FILE, ReceiptError, verify_files

    receipt_path = results.parent / RECEIPT_FILE if receipt_path is None else receipt_path
    report = verify_files(results, receipt_path, key_path)
    if not report.ok:
        n = len(report.problems)
        raise ReceiptError(f"{receipt_path} does not vouch for {results}: {n} problem{'' if n == 1 else 's'}",
                           reasons=report.problems)
    click.echo(f"ok: {report.summary()}")
