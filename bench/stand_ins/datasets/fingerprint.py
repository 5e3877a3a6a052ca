import hashlib


class Hasher:
    @staticmethod
    def hash(value) -> str:
        return hashlib.sha256(repr(value).encode()).hexdigest()[:16]
