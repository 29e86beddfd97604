"""Definition files: the reader, and the shape of the shipped definitions (never built here:
the TensorFlow image takes minutes and 500 MB)."""
import pytest

from containers.definition import Section, parse_definition
from tests.conftest import REPO

DEFINITIONS = REPO / "containers" / "definitions"

TEXT = """\
# comment
Bootstrap: localimage
From: base.sif

%arguments
    PKG=x==1

%files
    # a comment
    data/ /opt/data
    /etc/hosts

%files from build
    /out /out

%post -c /bin/bash
    echo {{ PKG }}
%environment
    export A=1
"""


def test_parse_definition():
    d = parse_definition(TEXT)
    assert d.header == {"bootstrap": "localimage", "from": "base.sif"}
    assert [(s.name, s.args) for s in d.sections] == [
        ("arguments", ""), ("files", ""), ("files", "from build"), ("post", "-c /bin/bash"),
        ("environment", "")]
    assert d.section("post") == Section("post", "-c /bin/bash", "    echo {{ PKG }}")
    assert d.section("runscript") is None
    assert d.file_sources() == ["data/", "/etc/hosts"]
    assert d.local_from() == "base.sif"


@pytest.mark.parametrize("text, fragment", [
    ("%post\n  true\n", "no 'Bootstrap:' header"),
    ("Bootstrap: docker\nFrom python\n", "line 2: expected 'Keyword: value' in the header"),
    ("Bootstrap: docker\n%postt\n", "line 2: unknown section %postt"),
])
def test_parse_definition_rejects(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_definition(text)
    assert fragment in str(e.value)


def test_debootstrap_has_no_local_from():
    assert parse_definition("Bootstrap: debootstrap\nOSVersion: bookworm\n").local_from() is None


def test_tensorflow_definition_shape():
    d = parse_definition((DEFINITIONS / "tensorflow.def").read_text())
    assert d.header["bootstrap"] == "debootstrap"
    assert d.header["osversion"] == "bookworm"
    assert {"python3", "python3-venv"} <= set(d.header["include"].split())
    assert d.section("arguments").body.split() == ["TF_PACKAGE=tensorflow-cpu==2.21.0"]
    assert d.file_sources() == ["/etc/ssl/certs/ca-certificates.crt"]
    post = d.section("post").body
    assert "python3 -m venv /opt/venv" in post
    assert "PIP_CERT=/opt/build-ca.crt /opt/venv/bin/pip install --no-cache-dir " \
           "'{{ TF_PACKAGE }}'" in post
    assert post.index("pip install") < post.index("rm -f /opt/build-ca.crt")
    assert "export PATH=/opt/venv/bin:$PATH" in d.section("environment").body
    text = (DEFINITIONS / "tensorflow.def").read_text()
    assert "--build-arg TF_PACKAGE='tensorflow[and-cuda]==2.21.0'" in text


def test_base_definition_shape():
    d = parse_definition((DEFINITIONS / "debian-python.def").read_text())
    assert (d.header["bootstrap"], d.header["include"]) == ("debootstrap", "python3")
    assert d.section("runscript") is not None
