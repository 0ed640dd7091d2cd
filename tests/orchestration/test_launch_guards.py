"""Fast checks of what the launchers refuse or leave out: no credential in Ray's runtime_env, argv or the run
config; no relative storage path inside a `ray job submit` working-dir copy. (The real `ray job submit` run
that greps Ray's logs and the run's files for the credentials is in test_ray_job_and_demo.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from data_pipeline.cli import main as data_pipeline_main
from orchestration.pretrain.config import RunConfig, parse_run_config
from orchestration.pretrain.launch import check_run_paths, in_ray_working_dir_copy
from orchestration.runtime.ray_launch import SECRET_ENV_NAME, ray_runtime_env

CREDS = {"AWS_ACCESS_KEY_ID": "AKIASOHOUNITTEST0001", "AWS_SECRET_ACCESS_KEY": "soho-unit-secret-7f3a",
         "AWS_SESSION_TOKEN": "soho-unit-session-91c2", "HF_TOKEN": "hf_soho_unit_token"}


def test_runtime_env_carries_settings_but_no_credential() -> None:
    environ = {**CREDS, "AWS_DEFAULT_REGION": "eu-west-1", "SOHO_CACHE_DIR": "/data/cache",
               "HF_HUB_OFFLINE": "1", "AWS_SHARED_CREDENTIALS_FILE": "/secrets/aws"}
    env = ray_runtime_env(False, environ)
    assert env == {"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
                                "AWS_DEFAULT_REGION": "eu-west-1", "SOHO_CACHE_DIR": "/data/cache",
                                "HF_HUB_OFFLINE": "1"}}
    text = json.dumps(env)
    assert [v for v in CREDS.values() if v in text] == []
    assert ray_runtime_env(True, {})["env_vars"] == {"DS_ACCELERATOR": "cuda",
                                                                         "PYTHONUNBUFFERED": "1"}


def test_run_config_and_its_saved_form_hold_no_secret_field() -> None:
    # The run config is logged, served as Prometheus info and saved in every train_state.json.
    assert [f.name for f in dataclasses.fields(RunConfig) if SECRET_ENV_NAME.search(f.name)] == []
    cfg = parse_run_config(["--storage-path", "s3://bucket/runs", "--s3-endpoint-url", "http://127.0.0.1:9000"])
    assert [v for v in CREDS.values() if v in json.dumps(cfg.to_dict())] == []


@pytest.mark.parametrize("flag,var", [("--s3-secret-key", "AWS_SECRET_ACCESS_KEY"),
                                      ("--s3-access-key", "AWS_ACCESS_KEY_ID"),
                                      ("--s3-session-token", "AWS_SESSION_TOKEN")])
def test_secret_flags_are_refused_with_the_variable_to_use(
    flag: str, var: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_run_config(["--max-steps", "3", f"{flag}=abc123"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} is not accepted" in err and var in err and "credentials file" in err
    with pytest.raises(SystemExit) as exc:
        data_pipeline_main(["synth", "--num", "2", "--output", str(tmp_path / "s"), flag, "abc123"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} is not accepted" in err and var in err
    assert not (tmp_path / "s").exists()


def _ray_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "session_2026" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    return copy


def test_relative_storage_path_is_refused_inside_a_ray_working_dir_copy(tmp_path: Path) -> None:
    copy = _ray_copy(tmp_path)
    assert in_ray_working_dir_copy(str(copy)) and in_ray_working_dir_copy(str(copy / "sub"))
    assert not in_ray_working_dir_copy(str(tmp_path)) and not in_ray_working_dir_copy(str(copy.parent) + "x")
    for relative in ("./runs", "runs", "../runs"):
        with pytest.raises(ValueError) as exc:
            check_run_paths(RunConfig.of(storage_path=relative), cwd=str(copy))
        msg = str(exc.value)
        assert repr(relative) in msg and "absolute path" in msg and "s3://" in msg and "working dir" in msg
    for ok in (str(tmp_path / "runs"), "s3://bucket/runs"):  # absolute or object storage: accepted there
        check_run_paths(RunConfig.of(storage_path=ok), cwd=str(copy))
    check_run_paths(RunConfig.of(storage_path="./runs"), cwd=str(tmp_path))  # a user's own folder: fine


def test_relative_storage_path_refused_through_the_real_cwd(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_ray_copy(tmp_path))
    with pytest.raises(ValueError, match="temporary copy"):
        check_run_paths(RunConfig.of())  # the default ./runs
    monkeypatch.setenv("SOHO_STORAGE_PATH", str(tmp_path / "runs"))  # the documented cluster-wide default
    check_run_paths(RunConfig.of())
    assert os.path.isabs(RunConfig.of().checkpoint.storage_path)


@pytest.mark.parametrize("field,value", [("storage_path", "s3://AKIAX:topsecret@bucket/runs"),
                                         ("s3_endpoint_url", "http://minio:minio-secret@127.0.0.1:9000"),
                                         ("data", "https://user:pw123@example.com/shards/manifest.json")])
def test_urls_with_a_password_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError) as exc:
        check_run_paths(RunConfig.of(**{field: value}))
    msg = str(exc.value)
    assert f"--{field.replace('_', '-')}" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert value not in msg and "secret@" not in msg and "pw123" not in msg
