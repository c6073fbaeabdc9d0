class FrugalError(Exception):
    """A user-facing error: printed without traceback, exit code 2."""


class ConfigError(FrugalError): ...


class DataError(FrugalError): ...


class CheckpointError(FrugalError): ...
