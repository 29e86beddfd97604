"""The S3 store of the dev cluster (SeaweedFS on 127.0.0.1:9000) with the keys Ansible made."""
import hashlib
import os
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

pytestmark = pytest.mark.s3


def client(creds, secret=None):
    return boto3.client(
        "s3", endpoint_url=creds["endpoint"], region_name=creds["region"],
        aws_access_key_id=creds["access_key"], aws_secret_access_key=secret or creds["secret_key"],
        config=Config(signature_version="s3v4", retries={"max_attempts": 2},
                      connect_timeout=5, read_timeout=30))


@pytest.fixture
def bucket(s3_credentials):
    s3 = client(s3_credentials)
    name = "test-%s" % uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=name)
    yield name
    for obj in s3.list_objects_v2(Bucket=name).get("Contents", []):
        s3.delete_object(Bucket=name, Key=obj["Key"])
    s3.delete_bucket(Bucket=name)


def test_round_trip_keeps_bytes_and_unicode_keys(s3_credentials, bucket):
    s3 = client(s3_credentials)
    data = os.urandom(3 * 1024 * 1024 + 17)
    key = "nested/dir/données ✓.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="nested/")["Contents"]]
    assert listed == [key]
    got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def test_wrong_secret_is_refused(s3_credentials, bucket):
    bad = client(s3_credentials, secret="not-the-secret-" + "x" * 25)
    with pytest.raises(ClientError) as err:
        bad.list_objects_v2(Bucket=bucket)
    assert err.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}
    with pytest.raises(ClientError):
        bad.put_object(Bucket=bucket, Key="intruder", Body=b"x")
    assert "Contents" not in client(s3_credentials).list_objects_v2(Bucket=bucket)


def test_anonymous_requests_are_refused(s3_credentials, bucket):
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen("%s/%s" % (s3_credentials["endpoint"], bucket), timeout=5)
    assert err.value.code == 403
    err.value.close()


def test_credentials_file_is_root_only():
    mode = os.stat("/etc/aiportal/s3-admin.json").st_mode & 0o777
    assert mode == 0o600
