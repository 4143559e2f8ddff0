"""The command line as a new user meets it: an option that does not apply is an error, --help
shows every default, a bad option fails before any work is done, and every failure is one typed
line on stderr with exit status 2."""
import argparse
import json

import pytest

from dynaexq_jax.cli import build_parser, main

LONG_PROMPT = "def f(x):\n    return x + 1\n\n" * 40        # far more than 64 tokens


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, command, *fragments):
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"dynaexq {command}: error: "), err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dynaexq_jax.experiments import default_model
    return default_model.converted_model(None, tmp_path_factory.mktemp("cli") / "converted", progress=False)


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# ---- generate: the one-tier path and the budgeted path take different options ----------------------
@pytest.mark.parametrize("option, value", [("--policy", "lfu"), ("--strategy", "greedy"), ("--period", 8),
                                           ("--delta", 0.1), ("--rate-limit", 1), ("--alpha", 0.5),
                                           ("--transfers", 2)])
def test_a_runtime_option_without_budget_is_an_error(model_dir, capsys, option, value):
    rc, _, err = run(capsys, "generate", model_dir, "--prompt", "x", "--max-new-tokens", 1, option, value)
    assert_one_line_error(rc, err, "generate", f"{option} applies only with --budget")


def test_every_misplaced_option_is_named(model_dir, capsys):
    rc, _, err = run(capsys, "generate", model_dir, "--prompt", "x", "--policy", "static", "--alpha", 0.5)
    assert_one_line_error(rc, err, "generate", "--policy, --alpha apply only with --budget")


def test_tier_with_budget_is_an_error(model_dir, capsys):
    rc, _, err = run(capsys, "generate", model_dir, "--prompt", "x", "--budget", "1GiB", "--tier", "lo")
    assert_one_line_error(rc, err, "generate", "--tier applies only without --budget")


def test_max_len_without_budget_sizes_the_cache(model_dir, capsys):
    rc, _, err = run(capsys, "generate", model_dir, "--prompt", LONG_PROMPT, "--max-len", 64)
    assert_one_line_error(rc, err, "generate", "max_len=64")
    rc, out, _ = run(capsys, "generate", model_dir, "--prompt", "def f(x):", "--max-len", 64, "--max-new-tokens", 4)
    assert rc == 0 and "4 generated" in out


# ---- --help ----------------------------------------------------------------------------------------
def help_text(capsys, monkeypatch, command) -> str:
    monkeypatch.setenv("COLUMNS", "1000")      # one line per option: no wrapping inside a default
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(commands()))
def test_help_explains_every_option_and_shows_its_default(capsys, monkeypatch, command):
    text = help_text(capsys, monkeypatch, command)
    for action in commands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.dest} has no help"
        if action.option_strings and action.default is not None and action.default is not False:
            assert "default" in action.help or f"(default: {action.default})" in text, (command, action.dest)


def test_budget_help_shows_the_plan_defaults_in_budget_words(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, "budget")
    assert "(default: 1)" in text and "(default: 2048)" in text
    assert "runs the DynaExq runtime" not in text
    assert "runs the DynaExq runtime" in help_text(capsys, monkeypatch, "generate")


@pytest.mark.parametrize("option, value", [("--alpha", 0.5), ("--period", 8), ("--segment", 8)])
def test_budget_rejects_options_the_plan_does_not_depend_on(model_dir, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        main(["budget", str(model_dir), "--budget", "1GiB", option, str(value)])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_the_demo_prints_the_budget_command_that_reproduces_its_plan(tmp_path, capsys):
    rc, out, _ = run(capsys, "demo", "--workdir", tmp_path, "--max-new-tokens", 4, "--segment", 4)
    assert rc == 0
    command = next(line for line in out.splitlines() if "dynaexq budget" in line).split("dynaexq ", 1)[1].split()
    demo_slots = next(line for line in out.splitlines() if "HI slots per MoE layer" in line).split()
    rc, out, err = run(capsys, *command)
    assert rc == 0, err
    assert next(line for line in out.splitlines() if "HI slots per MoE layer" in line).split() == demo_slots


# ---- bad options fail before any work ----------------------------------------------------------------
def test_compare_rejects_a_bad_option_before_converting(tmp_path, capsys):
    rc, _, err = run(capsys, "compare", "--out", tmp_path, "--policies", "foo")
    assert_one_line_error(rc, err, "compare", "unknown policies ['foo']")
    assert not (tmp_path / "converted").exists()


# ---- convert with calibration text (gptq) --------------------------------------------------------------
def test_convert_with_calibration_text_records_it(tmp_path, capsys):
    from dynaexq_jax.experiments import default_model
    text = tmp_path / "calibration.txt"
    text.write_text(LONG_PROMPT * 4)
    rc, out, err = run(capsys, "convert", default_model.HF_DIR, tmp_path / "g", "--hi", "int4:g64", "--lo",
                       "int2:g64:gptq", "--calibration", text, "--calibration-tokens", 1000, "--quiet")
    assert rc == 0, err
    rc, out, err = run(capsys, "info", tmp_path / "g")
    assert "tier lo: int2:g64:gptq" in out and "calibration (lo): 512 tokens in 1 rows of 512" in out, out
    assert "LO costs (sum (w |y_lo - y_hi|)^2 / sum w over routed tokens; --policy sensitivity)" in out, out


def test_generate_with_the_sensitivity_policy_needs_stored_lo_costs(tmp_path, capsys, model_dir):
    # The embedded model's conversion calibrates (its LO costs are stored); a conversion without
    # calibration text has none, and --policy sensitivity then says how to get them.
    from dynaexq_jax.experiments import default_model
    rc, out, err = run(capsys, "generate", model_dir, "--prompt", "def f(x):", "--max-new-tokens", 4,
                       "--budget", "25%", "--policy", "sensitivity")
    assert rc == 0 and "policy sensitivity" in out, (out, err)
    rc, _, err = run(capsys, "convert", default_model.HF_DIR, tmp_path / "plain", "--hi", "int4:g64", "--lo",
                     "int2:g64", "--quiet")
    assert rc == 0, err
    rc, _, err = run(capsys, "generate", tmp_path / "plain", "--prompt", "x", "--budget", "25%", "--policy",
                     "sensitivity")
    assert_one_line_error(rc, err, "generate", "plain: policy 'sensitivity' ranks by what each expert's LO copy",
                          "--calibration FILE")


@pytest.mark.parametrize("argv, fragment", [
    (["--lo", "int2:gptq"], "LO tier int2:g64:gptq: gptq quantizes with the Hessians of calibration inputs"),
    (["--calibration-tokens", 100], "--calibration-tokens: give the calibration text too"),
    (["--lo", "int2:gptq", "--calibration", "/nonexistent.txt"], "cannot read it as UTF-8 text"),
    (["--lo", "int2:gptq", "--calibration", "TEXT", "--calibration-tokens", 10], "must be an integer >= 64"),
])
def test_convert_calibration_errors_write_nothing(tmp_path, capsys, argv, fragment):
    from dynaexq_jax.experiments import default_model
    text = tmp_path / "calibration.txt"
    text.write_text(LONG_PROMPT)
    argv = [text if a == "TEXT" else a for a in argv]
    rc, _, err = run(capsys, "convert", default_model.HF_DIR, tmp_path / "out", *argv)
    assert_one_line_error(rc, err, "convert", fragment)
    assert not (tmp_path / "out").exists()


# ---- one clear line for a wrong input -----------------------------------------------------------------
def test_info_on_a_file_says_it_is_a_file(tmp_path, capsys):
    f = tmp_path / "README.md"
    f.write_text("# not a checkpoint\n")
    rc, _, err = run(capsys, "info", f)
    assert_one_line_error(rc, err, "info", "is a file, not a converted checkpoint directory")


def test_plot_of_a_stats_file_without_runtime_says_what_is_missing(model_dir, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    rc, _, _ = run(capsys, "generate", model_dir, "--prompt", "x", "--max-new-tokens", 2, "--stats", stats)
    assert rc == 0 and json.loads(stats.read_text())["runtime"] is None
    rc, _, err = run(capsys, "plot", stats)
    assert_one_line_error(rc, err, "plot", "no 'runtime' section", "--budget")
    assert "Error" not in err


@pytest.mark.parametrize("content, fragment", [
    (None, "file not found"),
    ("# a README\n", "not JSON"),
    ({"prompts": ["x"]}, "no 'runtime' section"),
    ({"runtime": {"policy": "dynaexq"}}, "'runtime.timeline') is missing or empty"),
    ({"runtime": {"timeline": [{"step": 0, "hi_mask": [[True]]}]}}, "runtime.timeline[0] has no 'scores'"),
])
def test_plot_errors_name_what_is_missing_without_python_exception_names(tmp_path, capsys, content, fragment):
    stats = tmp_path / "stats.json"
    if content is not None:
        stats.write_text(content if isinstance(content, str) else json.dumps(content))
    rc, _, err = run(capsys, "plot", stats)
    assert_one_line_error(rc, err, "plot", fragment)
    assert not any(name in err for name in ("KeyError", "TypeError", "JSONDecodeError", "FileNotFoundError"))


# ---- serve ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,fragments", [
    (["--policy", "static"], ["--policy applies only with --budget"]),
    (["--budget", "20%", "--tier", "lo"], ["--tier applies only without --budget"]),
    (["--max-batch", "0"], ["--max-batch must be an integer >= 1"]),
    (["--max-queue", "-3"], ["--max-queue must be an integer >= 1"]),
    (["--request-timeout", "0"], ["--request-timeout must be > 0"]),
    (["--budget", "20%", "--policy", "nope"], ["unknown policy 'nope'"]),
])
def test_serve_rejects_bad_options_before_loading(capsys, model_dir, argv, fragments):
    rc, out, err = run(capsys, "serve", model_dir, *argv)
    assert_one_line_error(rc, err, "serve", *fragments)
    assert "serving" not in out
