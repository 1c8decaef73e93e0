"""`speedrun data stage|verify|prepare`: exit codes and the one-sentence errors a user sees."""
from orchestrator.cli import main

SYN = "synthetic://markov?states=32&branch=2&doc_len=16&train_shards=2&shard_tokens=20000"


def test_stage_then_verify(tmp_path, capsys):
    assert main(["data", "stage", "--source", SYN, "--dest", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "2 train + 1 val shards" in out and "entropy rate" in out
    assert main(["data", "verify", str(tmp_path / "d")]) == 0
    (tmp_path / "d" / "fineweb_train_000002.bin").write_bytes(b"\0" * 2000)
    assert main(["data", "verify", str(tmp_path / "d")]) == 1
    assert "bad magic" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_sentence_and_creates_nothing(tmp_path, capsys):
    assert main(["data", "stage", "--source", SYN + "&seeds=3", "--dest", str(tmp_path / "d")]) == 2
    assert "did you mean 'seed'" in capsys.readouterr().err
    assert main(["data", "stage", "--source", str(tmp_path / "none"), "--dest", str(tmp_path / "d")]) == 2
    assert main(["data", "prepare", "--input", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such input file" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()
