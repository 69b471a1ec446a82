"""A 1024-bit RSA key pair for the DKIM and DMARC tests (made for them; it guards nothing).

A fixed key keeps the tests fast and free of a key-generation dependency. 1024 bits is
dkimpy's default minimum for verification.
"""

PRIVATE_KEY = b"""\
-----BEGIN RSA PRIVATE KEY-----
MIICXgIBAAKBgQC8QOmzoafWDQMhXfvEIHpA1V4WLXTVW8QlpvDKAviPkBQV1qiZ
j2diP2ifjroPyWPhW6Agt8YOlq/ox+le3cV3h74Kl1GksweoP0bGRSa6RCqCjT08
nTEBfI7qg9mYF7GC9liYdA2Yb27dtPfqhL0mQfSbiRiV2ZkXy/tUbOxCEwIDAQAB
AoGBAJ9Dt7PePtULuys+jOJ3q5YwLWJL4L0k3sQQAUSW0Nz8QtHbAlawCQIIrSXY
JTd35QVidA1aDLiI6ZfhkWFN9GFf5h0hYJKJyh2jUDc0l9QjVs1d8ObCNAbVXFAd
Bc/W9al6HOu7dFi6hjQM5i3ywQI0RGhl6bZLUu76PUZwjkshAkEA7zbnyhX6oMFV
+tmxqKq21jj3fJwOuMkiXSw/aA+lqunrJSHQCvg+blQb5on4ZERt5FZW13wBMhcF
S3m4GXjuUQJBAMl2lB1NFK0MjvCVT/KYRsU3x//KG38xf9hamsaoUOX0mEHFHO5V
yJm1IB8Gq1PCbd24I9Yehp9d78/vQth8nSMCQQCdnRKaL2Mkel6ZWshY9qpjecNv
Qi/dBwFyXI4mlXC1rUy2+ZFnOOuBrD955dxYzFGPymeLsXPkOhDOCxQHDIwRAkEA
jaku3yerST+SZ0Nmsxw2b0kY/hkcmqSw0+5p9RS3xernASBcho6Vfteo3YgwArat
0IFB2bcfTIKeNWV1aIq/ZwJABHrSLdWIxVAnE+7i2XMDmuvyhYeCkVKZEXmzLRwc
wTScYTJBUWiSNk8BadQ1jRhziNyHfA8TARDn/OzlvJ6ggw==
-----END RSA PRIVATE KEY-----
"""

#: base64 of the DER SubjectPublicKeyInfo, as it goes into a DKIM key record's ``p=``
PUBLIC_KEY = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC8QOmzoafWDQMhXfvEIHpA1V4WLXTVW8QlpvDKAviPkBQV1qiZj2diP2ifjroPyWPhW6Agt8YOlq/ox+le3cV3h74Kl1GksweoP0bGRSa6RCqCjT08nTEBfI7qg9mYF7GC9liYdA2Yb27dtPfqhL0mQfSbiRiV2ZkXy/tUbOxCEwIDAQAB"  # noqa: E501


def key_record(public_key: str = PUBLIC_KEY) -> str:
    """The TXT record text of ``<selector>._domainkey.<domain>``."""
    return f"v=DKIM1; k=rsa; p={public_key}"
