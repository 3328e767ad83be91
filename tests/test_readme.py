"""The README's runnable snippets run and say what the README says they do."""

import contextlib
import io
import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_setup_commands_are_the_ci_commands():
    setup = section("Set up")
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    assert "python -m sortgrad.demo" in commands[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_why_is_my_gradient_zero_snippets():
    blocks = python_blocks(section("Why is my gradient zero?"))
    assert len(blocks) == 2
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    theta = namespace["theta"]
    assert np.all(np.asarray(jax.grad(namespace["hard"])(theta)) == 0)
    for name in ("soft", "soft_low"):
        f = namespace[name]
        grad = np.asarray(jax.grad(f)(theta))
        h = 1e-6
        fd = np.array([(f(theta + h * e) - f(theta - h * e)) / (2 * h)
                       for e in np.eye(theta.shape[0])])
        assert np.abs(grad).max() > 1e-3
        np.testing.assert_allclose(grad, fd, atol=1e-6)
    assert np.abs(np.asarray(jax.grad(namespace["perturbed"])(theta))).max() > 1e-3
