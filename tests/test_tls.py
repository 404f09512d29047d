"""A team server behind TLS, its certificate signed by a private CA (one this test makes): with
MLFLOW_TRACKING_SERVER_CERT_PATH naming the CA, the stages train and log to it as MLflow's own client does; without
it, a stage stops at once in one line that names the variable, and nothing is trained or waited on."""
import datetime
import hashlib
import ipaddress
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from projects import free_port, http_service, new_project, user_env

from vaelab import access, store
from vaelab.stages import StageError

pytestmark = pytest.mark.e2e
CA_VARIABLE = "MLFLOW_TRACKING_SERVER_CERT_PATH"


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, *extensions: x509.ExtensionType) -> x509.Certificate:
    """A certificate valid for a day, self-signed when there is no `issuer`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    for extension in extensions:  # a CA's constraints and key usage are critical, as RFC 5280 asks
        critical = isinstance(extension, (x509.BasicConstraints, x509.KeyUsage))
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls(module_tmp_path) -> dict[str, Path]:
    """A team's private CA (ca.pem) and the server's key and certificate for 127.0.0.1, signed by that CA, with the
    subjectAltName IP 127.0.0.1 that clients check."""
    folder = module_tmp_path / "tls"
    folder.mkdir()
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("vaelab test CA", ca_key, None, ca_key, x509.BasicConstraints(ca=True, path_length=0),
                      x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                                    encipher_only=False, decipher_only=False),
                      x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()))
    server = _certificate("127.0.0.1", server_key, ca, ca_key,
                          x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                          x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()))
    paths = {"ca": folder / "ca.pem", "certificate": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["certificate"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def server(module_tmp_path, mnist_dir, tls) -> str:
    """`mlflow server` serving HTTPS itself: MLflow 3 runs uvicorn, whose TLS options --uvicorn-opts passes on."""
    folder = module_tmp_path / "server"
    folder.mkdir()
    port, uvicorn_tls = free_port(), f"--ssl-keyfile {tls['key']} --ssl-certfile {tls['certificate']}"
    # this process's MLflow client keeps a TLS connection open, which would hold the server's end for 30 s
    uvicorn_tls += " --timeout-graceful-shutdown 5"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
               str(folder / "artifacts"), "--uvicorn-opts", uvicorn_tls]
    with http_service(command, f"https://127.0.0.1:{port}", folder, user_env(mnist_dir), folder / "server.log",
                      trusting=ssl.create_default_context(cafile=tls["ca"])) as url:
        yield url


@pytest.fixture(scope="module")
def trained(server, tls, module_tmp_path, mnist_dir):
    env = user_env(mnist_dir, MLFLOW_TRACKING_URI=server, **{CA_VARIABLE: str(tls["ca"])})
    project = new_project(module_tmp_path / "project", env, epochs=1)
    project.run("dvc", "repro")
    return project


def _runs(server: str, tls: dict[str, Path], monkeypatch) -> list:
    monkeypatch.setenv(CA_VARIABLE, str(tls["ca"]))
    client = MlflowClient(server)
    return client.search_runs([client.get_experiment_by_name("vaelab").experiment_id])


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_with_the_ca_named_the_stages_train_and_log_to_the_server(server, tls, trained, monkeypatch):
    [run] = _runs(server, tls, monkeypatch)
    assert run.info.status == "FINISHED" and "test/iwae_nll" in run.data.metrics
    assert run.info.run_id in (trained / "models" / "run.json").read_text()
    assert {"figures", "evaluation.md"} <= {a.path for a in MlflowClient(server).list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("stage", ["train", "evaluate"])  # evaluate waits for a server that is away: not for this
def test_without_the_ca_a_stage_stops_in_one_line_naming_the_variable_and_does_nothing(
        server, tls, trained, monkeypatch, stage):
    runs = [run.info.run_id for run in _runs(server, tls, monkeypatch)]
    outputs = {path: _md5(path) for path in [*(trained / "models").iterdir(), trained / "reports" / "metrics.json"]}
    words = yaml.safe_load((trained / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    env = {k: v for k, v in trained.env.items() if k != CA_VARIABLE}
    started = time.monotonic()
    result = subprocess.run([sys.executable, *words[words.index("python") + 1:]], cwd=trained.root, capture_output=True,
                            text=True, env=dict(env, PYTHONPATH="src", VAELAB_TRACKING_PATIENCE_SECONDS="600"))
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output and time.monotonic() - started < 60
    assert (f"error: the MLflow tracking server {server} presented a certificate that is not trusted (unable to get "
            f"local issuer certificate); set {CA_VARIABLE} to the CA bundle that signed it") in output.splitlines()
    assert "epoch" not in output and "log p(x)" not in output  # neither trained nor evaluated
    assert {path: _md5(path) for path in outputs} == outputs
    assert not list((trained / ".vaelab" / "checkpoints").glob("*/state.pt"))
    assert [run.info.run_id for run in _runs(server, tls, monkeypatch)] == runs


def test_a_certificate_that_is_not_trusted_is_no_outage_to_wait_out(server, monkeypatch):
    """What `patiently` does at a stage's end, and the sender thread mid-training, with MLflow's client: the
    certificate is named at once in one line, not retried for the patience as a server that is away would be."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.delenv(CA_VARIABLE, raising=False)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(server).search_experiments()
    assert not store.transient(refused.value)
    started = time.monotonic()
    with pytest.raises(StageError) as stopped:
        store.patiently(lambda: MlflowClient(server).search_experiments(), "the run's end (FINISHED)", "0123abcd",
                        patience=600)
    assert time.monotonic() - started < 60 and "\n" not in str(stopped.value)
    assert str(stopped.value).startswith(f"the MLflow tracking server {server} presented a certificate that is not "
                                         f"trusted (unable to get local issuer certificate); set {CA_VARIABLE} ")


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # urllib3's, as it should
def test_the_access_check_honours_mlflows_other_tls_settings_too(server, monkeypatch):
    """MLFLOW_TRACKING_INSECURE_TLS, which skips the check (for tests, never a team's server), is MLflow's, not
    vaelab's: the access check sends what MLflow's client sends."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    access.check_access(write=True)
