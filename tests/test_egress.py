"""What leaves a site: checked before it leaves, refused with a reason, and audited."""


import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.egress import EgressRefused, check
from protocol.messages import describe

GLOBAL = ArrayRecord({"w": torch.zeros(4, 3), "b": torch.zeros(3)})


def _reply(arrays=None, **metrics):
    rd = {"metrics": MetricRecord({"num-examples": 10.0, "train-loss": 1.0, "site-epsilon": [0.5, 0.0, 0.0],
                                   **metrics})}
    if arrays is not None:
        rd["arrays"] = ArrayRecord(arrays)
    return RecordDict(rd)


def test_model_weights_and_listed_statistics_may_leave():
    check(_reply({"w": torch.ones(4, 3), "b": torch.ones(3)}), GLOBAL, n_classes=5, n_sites=3)
    check(RecordDict({"metrics": MetricRecord({"stats-confusion": [0.0] * 25, "site-n": [1.0, 2.0, 3.0]})}),
          None, 5, 3)


@pytest.mark.parametrize("content, reason", [
    (_reply({"w": torch.ones(4, 3), "b": torch.ones(3), "pixels": torch.ones(64, 64)}), "unexpected \\['pixels'\\]"),
    (_reply({"w": torch.ones(64, 64), "b": torch.ones(3)}), "array w is float32\\(64, 64\\)"),
    (_reply({"w": torch.ones(4, 3, dtype=torch.float64), "b": torch.ones(3)}), "array w is float64"),
    (_reply({"w": torch.ones(4, 3), "b": torch.ones(3)}, **{"patient-ids": [1.0]}), "'patient-ids' is not on the allow-list"),
    (_reply({"w": torch.ones(4, 3), "b": torch.ones(3)}, **{"site-epsilon": [0.1] * 4096}), "4096 values; at most 3"),
    (RecordDict({"arrays": ArrayRecord({"w": torch.ones(4, 3), "b": torch.ones(3)}),
                 "config": ConfigRecord({"note": "x"})}), "record 'config'"),
])
def test_anything_else_is_refused_with_the_key_named(content, reason):
    with pytest.raises(EgressRefused, match=reason):
        check(content, GLOBAL, n_classes=5, n_sites=3)


def test_evaluate_replies_carry_no_arrays():
    with pytest.raises(EgressRefused, match="statistics only"):
        check(_reply({"w": torch.ones(4, 3), "b": torch.ones(3)}), None, 5, 3)


def test_describe_lists_every_key_and_hashes_the_payload():
    a = _reply({"w": torch.ones(4, 3), "b": torch.ones(3)})
    keys, digest = describe(a)
    by_key = {k["key"]: k for k in keys}
    assert by_key["arrays/w"]["shape"] == [4, 3] and by_key["arrays/w"]["bytes"] >= 48
    assert by_key["metrics/site-epsilon"]["shape"] == [3]
    b = _reply({"w": torch.ones(4, 3), "b": 2 * torch.ones(3)})
    assert describe(b)[1] != digest and describe(_reply({"w": torch.ones(4, 3), "b": torch.ones(3)}))[1] == digest


def test_a_run_key_from_the_coordinator_cannot_leave_the_sites_state_folders(tmp_path, monkeypatch):
    """The run key names folders at the site (privacy ledger, optimiser state): a hostile '../..'
    is refused before anything is written; two runs in same-named folders get different keys."""
    from types import SimpleNamespace

    from client.local import ledger_path, optimizer_path
    from server.provision import run_key

    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    site = SimpleNamespace(name="site-a")
    for hostile in ("../../etc", "..", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="not a plain name"):
            ledger_path(site, hostile)
        with pytest.raises(ValueError, match="not a plain name"):
            optimizer_path(site, hostile)
    k1, k2 = run_key(tmp_path / "a" / "run"), run_key(tmp_path / "b" / "run")
    assert k1 != k2 and k1.startswith("run-") and run_key(tmp_path / "a" / "run") == k1
    assert ledger_path(site, run_key(tmp_path / "odd name!")).parent.parent == tmp_path / "cache" / "privacy"
    assert not list(tmp_path.rglob("*.json"))


def test_a_reply_missing_a_model_array_is_refused():
    with pytest.raises(EgressRefused, match="missing \\['b'\\]"):
        check(_reply({"w": torch.ones(4, 3)}), GLOBAL, n_classes=5, n_sites=3)


def test_secure_aggregation_replies_carry_only_their_stage_keys_and_no_clear_arrays():
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from client.secure_aggregation import check_outgoing

    setup_keys = {Key.PUBLIC_KEY_1: b"k1", Key.PUBLIC_KEY_2: b"k2"}
    check_outgoing(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup_keys)}), Stage.SETUP)
    with pytest.raises(EgressRefused, match="unexpected keys \\['patients'\\]"):
        check_outgoing(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({**setup_keys, "patients": 3})}), Stage.SETUP)
    with pytest.raises(EgressRefused, match="would send record 'metrics'"):
        check_outgoing(RecordDict({"metrics": MetricRecord({"train-loss": 1.0})}), Stage.SETUP)
    collect = Stage.COLLECT_MASKED_VECTORS
    check_outgoing(RecordDict({"fitres.parameters": ArrayRecord(), "metrics": MetricRecord({"train-loss": 1.0})}),
                   collect)
    with pytest.raises(EgressRefused, match="in clear under secure aggregation"):
        check_outgoing(RecordDict({"fitres.parameters": ArrayRecord({"w": torch.ones(4, 3)})}), collect)
    with pytest.raises(EgressRefused, match="record 'notes' may not leave"):
        check_outgoing(RecordDict({"notes": MetricRecord({"x": 1.0})}), collect)


def test_site_policies_name_each_rule_the_run_breaks(monkeypatch):
    from client import policy

    monkeypatch.setattr(policy, "_app_hash", lambda: "a" * 64)
    assert policy.violations({}, "none", secure=False) == []
    strict = {"policy-require-dp": "sample", "policy-require-secagg": "true", "policy-code-sha256": "b" * 64}
    bad = policy.violations(strict, "none", secure=False)
    assert len(bad) == 3 and "dp='sample'" in bad[0] and "secure aggregation" in bad[1] and "aaaaaaaaaaaaaaaa" in bad[2]
    assert policy.violations({**strict, "policy-code-sha256": "a" * 64}, "sample", secure=True) == []


def test_average_states_weights_each_site_by_its_patients():
    from client.local import average_states

    a, b = {"w": torch.zeros(2), "n": torch.tensor(4)}, {"w": torch.ones(2) * 3, "n": torch.tensor(8)}
    out = average_states([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.full((2,), 2.25)) and out["w"].dtype == torch.float32
    assert out["n"].dtype == a["n"].dtype  # integer buffers keep their type


def test_an_audit_log_torn_by_a_crash_stays_readable_and_the_next_entry_survives(tmp_path, monkeypatch):
    from client.egress import append_audit, audit_path, summarize

    monkeypatch.setenv("CCMR_AUDIT_DIR", str(tmp_path))
    entry = {"time": "t", "run": "run-1", "kind": "train", "round": 1, "bytes": 10, "keys": [], "refused": ""}
    append_audit(["site-a"], entry)
    with open(audit_path("site-a"), "a") as f:
        f.write('{"time": "t", "run": "run-1", "ki')  # the process died mid-write
    append_audit(["site-a"], {**entry, "round": 2})
    text = summarize(audit_path("site-a"))
    assert "2 messages sent" in text and "rounds 1-2" in text
    assert "line(s) 2 damaged" in text


def test_a_failure_at_the_site_leaves_as_a_fixed_reason_and_its_detail_stays_in_the_audit(tmp_path, monkeypatch):
    """Issue 13: a handler's exception went back as text, past the guard: with the coordinator's
    cohort-dir pointing at site paths, 'Is a directory' vs 'No such file' said whether a folder
    exists. Every failure now leaves as the same reason; the detail is in the site's audit log."""
    from flwr.app import Context, Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import evaluate, train
    from client.egress import FAILED, audit_path, summarize
    from tests.test_federation import _run_config

    for k in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, k, 1)
    monkeypatch.setenv("CCMR_AUDIT_DIR", str(tmp_path / "audit"))
    (tmp_path / "patient-0001").mkdir()
    (tmp_path / "secret.csv").write_text("patient_id,diagnosis\nP-1,HCM\n")
    reasons = []
    for handler, kind in ((train, MessageType.TRAIN), (evaluate, MessageType.EVALUATE)):
        for probe in ("patient-0001", "patient-9999", "secret.csv"):
            msg = Message(RecordDict({"arrays": GLOBAL, "config": ConfigRecord({
                "cohort-dir": str(tmp_path / probe), "num-sites": 1, "bio-channels": 0, "run-key": "r",
                "global-round": 1})}), dst_node_id=1, message_type=kind)
            ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / probe), "site-name": "site-a"},
                          state=RecordDict(), run_config=_run_config(preset="smoke"))
            reply = handler(msg, ctx)
            assert reply.has_error()
            reasons.append(reply.error.reason)
    assert set(reasons) == {FAILED}  # the same words whatever the path: nothing to probe with
    text = audit_path("site-a").read_text()
    assert "patient-9999" in text and "failed at the site" in summarize(audit_path("site-a"))


def test_no_statistics_about_fewer_patients_than_the_sites_floor_leave(cohort, tmp_path, monkeypatch):
    """Issue 14 item 10: counts over one or two patients describe those patients (an evaluation
    oracle for a coordinator that crafts the model). The site's floor, node config it sets itself
    (ccmr-client start: 5), keeps such statistics at the site."""
    from flwr.app import Context, Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from ccmr_core.models.registry import build_model, model_kwargs
    from client.client_app import evaluate
    from client.cli import supernode_command
    from client.policy import DEFAULT_MIN_EVAL_PATIENTS
    from tests.test_federation import _run_config
    from ccmr_core.config import from_run_config

    for k in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, k, 1)
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CCMR_AUDIT_DIR", str(tmp_path / "audit"))
    rc = _run_config(preset="smoke")
    cfg = from_run_config(rc)
    model = build_model(cfg.model.name, **model_kwargs(cfg, 0))
    sent = {}
    for floor in (1, 50):
        msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({
            "cohort-dir": str(cohort), "num-sites": 1, "bio-channels": 0, "run-key": "r", "split": "val"})}),
            dst_node_id=1, message_type=MessageType.EVALUATE)
        ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(cohort / "site-a"), "site-name": "site-a",
                                                        "policy-min-eval-patients": floor},
                      state=RecordDict(), run_config=rc)
        reply = evaluate(msg, ctx)
        sent[floor] = reply.content["metrics"]["num-examples"]
    assert sent[1] > 0 and sent[50] == 0
    # a hospital's SuperNode gets the floor unless it chooses otherwise
    b = type("B", (), {"site": "h", "site_index": 0, "superlink": "x:1", "ca": "ca", "key": "k"})()
    assert f"policy-min-eval-patients={DEFAULT_MIN_EVAL_PATIENTS}" in " ".join(supernode_command(b, tmp_path, 9094))


def test_a_site_policy_file_holds_the_sites_rules_and_names_what_is_wrong(tmp_path):
    """Issue 13: the site's rules as a file the hospital keeps (or flags), turned into node config
    of its own SuperNode; errors name the file, the rule and what is allowed."""
    from types import SimpleNamespace

    from client.cli import site_policy, supernode_command
    from client.policy import PolicyError, _app_hash, load_policy, violations

    ok = tmp_path / "policy.yaml"
    ok.write_text(f"require_dp: sample\nmax_epsilon: 8\nallowed_code: ['{'0' * 64}', '{_app_hash()}']\n")
    p = load_policy(ok)
    assert p.require_dp == "sample" and p.max_epsilon == 8.0 and p.min_eval_patients == 5
    nc = p.node_config()
    assert 'policy-require-dp="sample"' in nc and "policy-max-epsilon=8.0" in nc and "policy-min-eval-patients=5" in nc
    node = {"policy-require-dp": "sample", "policy-code-sha256": ",".join(p.allowed_code)}
    assert violations(node, "sample", False) == []  # this code is one of the allowed versions
    assert "accepts only" in violations({"policy-code-sha256": "0" * 64}, "sample", False)[0]
    # under the site's worker the pin is checked against the app the coordinator shipped (the site
    # answers with its own code): a coordinator shipping other code is refused though the site's matches
    from client.policy import FAB_CODE_KEY

    assert "accepts only" in violations({**node, FAB_CODE_KEY: "1" * 64}, "sample", False)[0]
    assert violations({**node, FAB_CODE_KEY: "0" * 64}, "sample", False) == []
    for text, words in (("require_dp: maybe\n", "require_dp"), ("max_epsilon: -1\n", "max_epsilon"),
                        ("allowed_code: [abc]\n", "not a SHA-256"), ("requre_dp: sample\n", "requre_dp"),
                        ("- a list\n", "mapping of rules")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(PolicyError, match=words):
            load_policy(tmp_path / "bad.yaml")
    args = SimpleNamespace(policy=str(ok), require_dp=None, require_secagg=False, pin_code=None, max_epsilon=None,
                           min_eval_patients=10)
    assert site_policy(args).min_eval_patients == 10 and site_policy(args).require_dp == "sample"
    args.max_epsilon = 3.0  # also in the file: which would hold?
    with pytest.raises(PolicyError, match="both set max_epsilon"):
        site_policy(args)
    b = SimpleNamespace(site="h", site_index=0, superlink="x:1", ca="ca", key="k")
    cmd = " ".join(supernode_command(b, tmp_path, 9094, p))
    # the SuperNode runs no app of its own: the site's worker answers with the site's installed code
    assert "policy-max-epsilon=8.0" in cmd and "--isolation process" in cmd


def test_a_control_variate_leaves_only_in_a_scaffold_run_and_only_for_model_parameters():
    """SCAFFOLD's reply carries a "control" record beside the model: some of the model's names with
    their shapes and dtypes; outside such a run, or with any other name or shape, it is refused."""
    content = _reply({"w": torch.ones(4, 3), "b": torch.ones(3)})
    content["control"] = ArrayRecord({"w": torch.ones(4, 3)})
    check(content, GLOBAL, 5, 3, control=True)
    with pytest.raises(EgressRefused, match="'control' in a run without drift correction"):
        check(content, GLOBAL, 5, 3)
    content["control"] = ArrayRecord({"w": torch.ones(4, 3), "pixels": torch.ones(64, 64)})
    with pytest.raises(EgressRefused, match=r"unexpected \['pixels'\]"):
        check(content, GLOBAL, 5, 3, control=True)
    content["control"] = ArrayRecord({"w": torch.ones(64, 64)})
    with pytest.raises(EgressRefused, match=r"array w is float32\(64, 64\)"):
        check(content, GLOBAL, 5, 3, control=True)
