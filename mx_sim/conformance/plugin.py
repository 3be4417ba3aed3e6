"""pytest11 entry point of the conformance suite. Kept import-light: nothing heavy at import."""


def pytest_addoption(parser):
    group = parser.getgroup("mx-conformance")
    group.addoption(
        "--mx-adapter",
        default=None,
        help="engine adapter factory under test, as pkg.module:factory (env MX_ADAPTER)",
    )
