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
    namespaces = [{}, {}]  # each block runs on its own
    with contextlib.redirect_stdout(io.StringIO()):
        for block, namespace in zip(blocks, namespaces):
            exec(compile(block, str(README), "exec"), namespace)
    hard, namespace = namespaces[0]["hard"], namespaces[1]
    theta = namespace["theta"]
    np.testing.assert_array_equal(theta, namespaces[0]["theta"])  # the same data
    assert np.all(np.asarray(jax.grad(hard)(theta)) == 0)
    for name in ("soft", "soft_low"):
        f = namespace[name]
        grad = np.asarray(jax.grad(f)(theta))
        h = 1e-6
        fd = np.array([(f(theta + h * e) - f(theta - h * e)) / (2 * h)
                       for e in np.eye(theta.shape[0])])
        assert np.abs(grad).max() > 1e-3
        np.testing.assert_allclose(grad, fd, atol=1e-6)
    assert np.abs(np.asarray(jax.grad(namespace["perturbed"])(theta))).max() > 1e-3


def test_every_snippet_runs_on_its_own():
    """Each python block of the README in a fresh namespace (a reader copies one block); the
    blocks of "Why is my gradient zero?" are run (and checked) by the test above."""
    why = python_blocks(section("Why is my gradient zero?"))
    blocks = [b for b in python_blocks(README.read_text()) if b not in why]
    assert blocks
    for block in blocks:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block, str(README), "exec"), {})


def test_api_at_a_glance_says_what_it_does():
    import sortgrad
    import jax.numpy as jnp
    x = jnp.array([5.0, 1.0, 2.0])
    np.testing.assert_allclose(sortgrad.soft_rank(x, regularization_strength=2.0),
                               [3, 1.25, 1.75])
    np.testing.assert_allclose(sortgrad.soft_sort(x, regularization_strength=1.0),
                               [5 / 3, 8 / 3, 11 / 3], rtol=1e-6)
    values, indices = sortgrad.top_k(x, 2)
    np.testing.assert_array_equal(values, [5, 2])
    np.testing.assert_array_equal(indices, [0, 2])
    assert np.abs(np.asarray(jax.jacfwd(sortgrad.soft_rank)(x))).sum() > 0  # the pooled side
    keys, vals = sortgrad.sort_multiple([jnp.array([2, 1, 2]), jnp.array([0.5, 1.5, 2.5])])
    np.testing.assert_array_equal(keys, [1, 2, 2])
    np.testing.assert_array_equal(vals, [1.5, 0.5, 2.5])
