"""google-genai (Python): the Live API through the gateway. The SDK always
connects with wss://, so the gateway serves TLS with a test CA that the
SDK's process trusts through SSL_CERT_FILE."""

import asyncio
import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google import genai
from google.genai import types

from conftest import KEYS, TOKEN, Stack


def make_pki(directory):
    """A test CA and a certificate for localhost / 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gemini-balancer e2e CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: str(directory / name) for name in ("ca.pem", "cert.pem", "key.pem")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert.pem"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


async def one_turn(c, text):
    config = types.LiveConnectConfig(response_modalities=["TEXT"])
    async with c.aio.live.connect(model="gemini-live-2.5-flash", config=config) as session:
        await session.send_client_content(
            turns=types.Content(role="user", parts=[types.Part(text=text)]), turn_complete=True)
        answer = ""
        async for message in session.receive():
            if message.text:
                answer += message.text
        return answer


def test_a_live_session_through_the_gateway_over_tls(tmp_path, monkeypatch):
    pki = make_pki(tmp_path)
    stack = Stack(replicas=2, extra_env={"GB_TLS_CERT": pki["cert.pem"], "GB_TLS_KEY": pki["key.pem"]})
    try:
        assert all(u.startswith("https://") for u in stack.urls), stack.urls
        monkeypatch.setenv("SSL_CERT_FILE", pki["ca.pem"])
        for i, url in enumerate(stack.urls):
            c = genai.Client(api_key=TOKEN, http_options=types.HttpOptions(base_url=url))
            answer = asyncio.run(one_turn(c, f"hello live {i}"))
            assert answer.startswith("echo from key ") and answer.endswith(f": hello live {i}"), answer
            # The HTTP routes are served over the same TLS listener.
            assert "fake upstream" in c.models.generate_content(model="gemini-2.0-flash", contents="hi").text
        paths = [r["path"] for r in stack.fake.requests()]
        assert any(p.startswith("/ws/google.ai.generativelanguage.") for p in paths), paths
        for r in stack.fake.requests():
            assert r["headers"].get("x-goog-api-key") in KEYS
    finally:
        stack.stop()
    for secret in KEYS + [TOKEN]:
        assert secret not in stack.logs()


def test_an_ephemeral_token_minted_through_the_gateway_opens_a_live_session(tmp_path, monkeypatch):
    pki = make_pki(tmp_path)
    stack = Stack(replicas=2, extra_env={"GB_TLS_CERT": pki["cert.pem"], "GB_TLS_KEY": pki["key.pem"]})
    try:
        monkeypatch.setenv("SSL_CERT_FILE", pki["ca.pem"])
        minter = genai.Client(api_key=TOKEN, http_options=types.HttpOptions(base_url=stack.urls[0], api_version="v1alpha"))
        token = minter.auth_tokens.create(config=types.CreateAuthTokenConfig(uses=1))
        assert token.name.startswith("auth_tokens/")
        owner = stack.fake.resource_owners()[token.name]
        c = genai.Client(api_key=token.name, http_options=types.HttpOptions(base_url=stack.urls[1], api_version="v1alpha"))
        answer = asyncio.run(one_turn(c, "with an ephemeral token"))
        assert answer.endswith(": with an ephemeral token"), answer
        ws = [r for r in stack.fake.requests() if r["path"].startswith("/ws/")]
        assert ws and ws[-1]["path"].endswith("BidiGenerateContentConstrained"), ws
        served = stack.fake.served()
        assert served.get(owner, 0) >= 1, served
    finally:
        stack.stop()
    for secret in KEYS + [TOKEN, token.name.split("/", 1)[1]]:
        assert secret not in stack.logs()
