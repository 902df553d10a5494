"""Subscribe tokens: writes the JWKS file a node verifies them with and prints
a token for a browser.

python examples/subscribe_token.py [PRIVATE_KEY_PEM [JWKS_PATH]]

PRIVATE_KEY_PEM is an ES256 (P-256) private key, e.g. from
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem;
without it the example makes a throwaway key (its tokens verify only with the
JWKS written by this run). The JWKS (the public key only) goes to JWKS_PATH,
by default subscribe-token-jwks.json in the system's temporary directory.
Then start the node with
--subscribe-token-jwks JWKS_PATH --subscribe-token-audience shop.
"""

import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from entity_sync import SubscribeTokenSigner, jwks


def main(args: list[str]) -> None:
    if args:
        pem = Path(args[0]).read_bytes()
    else:
        print("no key given: signing with a throwaway key", file=sys.stderr)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    jwks_path = (
        Path(args[1])
        if len(args) > 1
        else Path(tempfile.gettempdir()) / ("subscribe-token-jwks.json")
    )

    # The kid names the key in the node's JWKS; a new key gets a new kid.
    signer = SubscribeTokenSigner.es256("2026-12-es256", pem, audience="shop")
    jwks_path.write_text(jwks([signer]))
    print(f"JWKS written to {jwks_path}", file=sys.stderr)
    print(
        f"start the node with --subscribe-token-jwks {jwks_path} --subscribe-token-audience shop",
        file=sys.stderr,
    )

    # After the application authenticated user 42 and decided what it may read:
    print(signer.sign("items", ["101", "102"], 300, subject="user-42"))


if __name__ == "__main__":
    main(sys.argv[1:])
