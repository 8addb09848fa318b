"""A test PKI made with the `openssl` command line (OpenSSL 3.0 or later), for the mTLS tests.

    pki = Pki(tmp_dir)            # builds everything below
    pki.root, pki.intermediate    # client CAs (root -> intermediate -> client leaves)
    pki.server                    # server certificate for 127.0.0.1 / localhost (own CA)
    pki.leaf["fp-device"]         # Cert: .crt .key .chain (leaf + intermediate) .fingerprint
    pki.crl_paths                 # [intermediate CRL, root CRL] (PEM)
    pki.revoke("late-device")     # revokes a leaf and rewrites the intermediate CRL in place

Client leaves (all issued by the intermediate unless said otherwise):
    fp-device       CN=fp-device,O=Contoso         mapped by fingerprint in the tests
    plant-7-edge    CN=plant-7-edge,O=Contoso      mapped by subject
    late-device     CN=late-device,O=Contoso       good until a test revokes it
    unmapped        CN=unmapped-device,O=Contoso   verifies, maps to no client
    revoked         CN=revoked-device,O=Contoso    listed in the intermediate's CRL
    expired         CN=expired-device,O=Contoso    valid 2020-01-01 .. 2020-02-01
    foreign         CN=foreign-device,O=Fabrikam   issued by another root CA
"""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

CNF = """\
[ ca ]
default_ca = CA_default

[ CA_default ]
dir              = {dir}
database         = $dir/index.txt
new_certs_dir    = $dir/newcerts
serial           = $dir/serial
crlnumber        = $dir/crlnumber
certificate      = $dir/ca.crt
private_key      = $dir/ca.key
default_md       = sha256
default_days     = 365
default_crl_days = 30
policy           = policy_any
unique_subject   = no
copy_extensions  = none
email_in_dn      = no

[ policy_any ]
organizationName = optional
commonName       = supplied

[ req ]
distinguished_name = req_dn
prompt             = no

[ req_dn ]
CN = unused

[ v3_root ]
basicConstraints       = critical,CA:TRUE
keyUsage               = critical,keyCertSign,cRLSign
subjectKeyIdentifier   = hash

[ v3_intermediate ]
basicConstraints       = critical,CA:TRUE,pathlen:0
keyUsage               = critical,keyCertSign,cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[ v3_client ]
basicConstraints       = critical,CA:FALSE
keyUsage               = critical,digitalSignature
extendedKeyUsage       = clientAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid

[ v3_server ]
basicConstraints       = critical,CA:FALSE
keyUsage               = critical,digitalSignature,keyEncipherment
extendedKeyUsage       = serverAuth
subjectAltName         = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid
"""


def openssl(*args: str, cwd: Path | None = None) -> str:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def fingerprint(crt: Path) -> str:
    """Lower-case hex SHA-256 of the certificate's DER (the first one in the file)."""
    pem = crt.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


def colon_upper(fp: str) -> str:
    """`ab12…` -> `AB:12:…` (the form `openssl x509 -fingerprint` prints)."""
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()


@dataclass
class Cert:
    name: str
    crt: Path
    key: Path
    chain: Path  # leaf then its issuing intermediate (what a client may send)
    subject: str  # RFC 4514, most specific first
    fingerprint: str


class Ca:
    """A CA with an `openssl ca` database, so that it can revoke and publish CRLs."""

    def __init__(self, base: Path, name: str, subj: str, parent: "Ca | None" = None):
        self.dir = base / name
        self.dir.mkdir(parents=True)
        (self.dir / "newcerts").mkdir()
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        (self.dir / "crlnumber").write_text("1000\n")
        self.cnf = self.dir / "openssl.cnf"
        self.cnf.write_text(CNF.format(dir=self.dir))
        self.key = self.dir / "ca.key"
        self.crt = self.dir / "ca.crt"
        self.crl = self.dir / "ca.crl.pem"
        self.parent = parent
        new_key(self.key)
        if parent is None:
            openssl("req", "-config", str(self.cnf), "-new", "-x509", "-key", str(self.key),
                    "-subj", subj, "-days", "3650", "-extensions", "v3_root",
                    "-out", str(self.crt))
        else:
            csr = self.dir / "ca.csr"
            openssl("req", "-config", str(self.cnf), "-new", "-key", str(self.key),
                    "-subj", subj, "-out", str(csr))
            parent.sign(csr, self.crt, "v3_intermediate", days=3650)
        self.gencrl()

    def sign(self, csr: Path, out: Path, ext: str, days: int = 365,
             startdate: str | None = None, enddate: str | None = None) -> None:
        args = ["ca", "-batch", "-notext", "-preserveDN", "-config", str(self.cnf),
                "-extensions", ext, "-in", str(csr), "-out", str(out)]
        if startdate:
            args += ["-startdate", startdate, "-enddate", enddate]
        else:
            args += ["-days", str(days)]
        openssl(*args)

    def revoke(self, crt: Path) -> None:
        openssl("ca", "-batch", "-config", str(self.cnf), "-revoke", str(crt),
                "-crl_reason", "keyCompromise")
        self.gencrl()

    def gencrl(self) -> None:
        tmp = self.crl.with_suffix(".tmp")
        openssl("ca", "-batch", "-config", str(self.cnf), "-gencrl", "-out", str(tmp))
        tmp.replace(self.crl)  # atomic: a reader never sees half a file


def new_key(path: Path) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", str(path))


class Pki:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.root = Ca(self.base, "root", "/O=Contoso/CN=Contoso Test Root CA")
        self.intermediate = Ca(self.base, "intermediate", "/O=Contoso/CN=Contoso Devices CA",
                               parent=self.root)
        self.other_root = Ca(self.base, "other-root", "/O=Fabrikam/CN=Fabrikam Root CA")
        self.server_ca = Ca(self.base, "server-ca", "/O=Gateway Test/CN=Gateway Server CA")

        self.server = self._issue(self.server_ca, "server", "/O=Gateway Test/CN=localhost",
                                  "v3_server")
        self.leaf: dict[str, Cert] = {}
        for name, cn in [("fp-device", "fp-device"), ("plant-7-edge", "plant-7-edge"),
                         ("late-device", "late-device"), ("unmapped", "unmapped-device"),
                         ("revoked", "revoked-device")]:
            self.leaf[name] = self._issue(self.intermediate, name, f"/O=Contoso/CN={cn}")
        self.leaf["expired"] = self._issue(
            self.intermediate, "expired", "/O=Contoso/CN=expired-device",
            startdate="20200101000000Z", enddate="20200201000000Z")
        self.leaf["foreign"] = self._issue(self.other_root, "foreign",
                                           "/O=Fabrikam/CN=foreign-device")
        self.intermediate.revoke(self.leaf["revoked"].crt)

        # What the gateway trusts: the root and the intermediate, and both CAs' CRLs.
        self.trust_bundle = self.base / "clients-ca.pem"
        self.trust_bundle.write_text(self.root.crt.read_text() + self.intermediate.crt.read_text())
        self.root_only_bundle = self.base / "clients-root.pem"
        self.root_only_bundle.write_text(self.root.crt.read_text())
        self.crl_paths = [self.intermediate.crl, self.root.crl]

    def _issue(self, ca: Ca, name: str, subj: str, ext: str = "v3_client",
               startdate: str | None = None, enddate: str | None = None) -> Cert:
        d = self.base / "leaves"
        d.mkdir(exist_ok=True)
        key, csr, crt, chain = (d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt",
                                d / f"{name}.chain.pem")
        new_key(key)
        openssl("req", "-config", str(ca.cnf), "-new", "-key", str(key), "-subj", subj,
                "-out", str(csr))
        ca.sign(csr, crt, ext, startdate=startdate, enddate=enddate)
        chain.write_text(crt.read_text() + (ca.crt.read_text() if ca.parent else ""))
        subject = openssl("x509", "-in", str(crt), "-noout", "-subject", "-nameopt",
                          "RFC2253").strip()
        subject = subject.removeprefix("subject=")
        return Cert(name, crt, key, chain, subject, fingerprint(crt))

    def revoke(self, name: str) -> None:
        """Revoke a client leaf issued by the intermediate and rewrite its CRL file."""
        self.intermediate.revoke(self.leaf[name].crt)
