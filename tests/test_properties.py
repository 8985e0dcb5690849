"""config.properties is read as Java reads it (`java.util.Properties.load`, TorchServe's reader).

The differential cases run the real `java.util.Properties` on the same text; TorchServe's own
config snapshots (`logs/config/*-snapshot.cfg`, written by `Properties.store`) escape every `:`
and `=`, which torchgate refused before.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from api.config import ConfigError, load_config, read_properties

READER = """
import java.io.*;
import java.util.*;

public class ReadProperties {
    public static void main(String[] args) throws Exception {
        Properties properties = new Properties();
        try (InputStream in = new FileInputStream(args[0])) {
            properties.load(in);
        }
        StringBuilder out = new StringBuilder("{");
        for (String key : new TreeSet<>(properties.stringPropertyNames())) {
            if (out.length() > 1) out.append(",");
            out.append(quoted(key)).append(":").append(quoted(properties.getProperty(key)));
        }
        System.out.println(out.append("}"));
    }

    static String quoted(String text) {
        StringBuilder out = new StringBuilder("\\"");
        for (char c : text.toCharArray()) out.append(String.format("\\\\u%04x", (int) c));
        return out.append("\\"").toString();
    }
}
"""

CASES = {
    "escaped separators": "inference_address=http\\://0.0.0.0\\:8080\nload_models=m\\=m.mar\n",
    "separators": "a=1\nb: 2\nc 3\nd\t=\t4\ne\n f = 6 \n",
    "continuations": "a=one \\\n    two\nb=ends in a backslash\\\\\nc=three \\\\\\\n  four\n",
    "comments": "# a=1\n! b=2\n  # c=3 \\\nd=4\n",
    "escapes": "a=tab\\there\nb=\\u00e9t\\u00E9\nc=new\\nline\nd=\\q\\ \\#x\nk\\ e\\:y=v\n",
    "model_snapshot": (
        'model_snapshot={\\n  "name"\\: "x.cfg",\\n  "models"\\: {\\n    "m"\\: {}\\n  }\\n}\n'
    ),
    "last line goes on": "a=1\nb=2\\",
    "java's line ends only": "a=x\fy\x0bz\x1c\x85w\r\nb=1\rc=2\n  \\\n\n",
}


def java_reads(path: Path, tmp_path: Path) -> dict[str, str]:
    source = tmp_path / "ReadProperties.java"
    source.write_text(READER)
    done = subprocess.run(
        ["java", str(source), str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (make tools installs it)")
def test_what_java_reads_torchgate_reads(tmp_path: Path) -> None:
    path = tmp_path / "cases.properties"
    for name, text in CASES.items():
        path.write_text(text, encoding="latin-1")
        expected = {k: v.rstrip(" \t\f") for k, v in java_reads(path, tmp_path).items()}
        assert read_properties(text) == expected, name


def test_a_torchserve_snapshot_is_a_config_file(tmp_path: Path) -> None:
    """As TorchServe 0.12 writes `logs/config/<time>-snapshot.cfg` (Properties.store)."""
    (tmp_path / "model_store").mkdir()
    snapshot = tmp_path / "20261207093000123-snapshot.cfg"
    snapshot.write_text(
        "#Saving snapshot\n"
        "#Mon Dec 07 09:30:00 UTC 2026\n"
        "inference_address=http\\://0.0.0.0\\:8085\n"
        "management_address=http\\://0.0.0.0\\:8086\n"
        "model_store=model_store\n"
        "load_models=digits\\=digits.mar\n"
        'model_snapshot={\\n  "name"\\: "20261207093000123-snapshot.cfg",\\n  "modelCount"\\: 1,'
        '\\n  "created"\\: 1796635800123,\\n  "models"\\: {\\n    "digits"\\: {\\n      "1.0"\\: {'
        '\\n        "defaultVersion"\\: true,\\n        "marName"\\: "digits.mar",'
        '\\n        "minWorkers"\\: 2,\\n        "maxWorkers"\\: 3,\\n        "batchSize"\\: 4,'
        '\\n        "maxBatchDelay"\\: 50,\\n        "responseTimeout"\\: 90'
        "\\n      }\\n    }\\n  }\\n}\n"
        "tsConfigFile=logs/config/20261207092000000-startup.cfg\n"
    )
    config = load_config(snapshot)
    assert (config.inference_address.host, config.inference_address.port) == ("0.0.0.0", 8085)
    assert config.management_address.port == 8086
    assert config.models_from_snapshot
    [entry] = config.models
    assert (entry.name, entry.version, entry.mar_name) == ("digits", "1.0", "digits.mar")
    settings = entry.settings
    assert (settings.min_workers, settings.max_workers, settings.batch_size) == (2, 3, 4)


def test_a_malformed_unicode_escape_is_refused() -> None:
    with pytest.raises(ConfigError, match="uxxxx"):
        read_properties("a=\\u12g4\n")
