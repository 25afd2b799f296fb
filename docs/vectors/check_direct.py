#!/usr/bin/env python3
"""Checks docs/vectors/direct.json with an implementation that shares no
code with keybroker: the `noiseprotocol` package (pip install
noiseprotocol). A terminal author can start from this file.

usage: check_direct.py [direct.json]
"""
import json
import struct
import sys
import warnings

from cryptography.hazmat.primitives.asymmetric import x25519
from noise.connection import Keypair, NoiseConnection


# The fixed ephemerals are what make this a vector; the library warns about them.
warnings.filterwarnings("ignore", message="One of ephemeral keypairs")


def frame(ty, payload):
    return bytes([ty]) + struct.pack(">I", len(payload)) + payload


def side(v, initiator):
    n = NoiseConnection.from_name(v["noise_protocol"].encode())
    n.set_psks(psk=bytes.fromhex(v["x"]))
    n.set_prologue(b"keybroker direct v2" + bytes.fromhex(v["session_id"]))
    key = v["terminal_ephemeral_private" if initiator else "market_ephemeral_private"]
    # noiseprotocol takes a fixed ephemeral as a key pair object.
    n.set_keypair_from_private_bytes(Keypair.EPHEMERAL, bytes.fromhex(key))
    n.set_as_initiator() if initiator else n.set_as_responder()
    n.start_handshake()
    return n


def main(path):
    v = json.load(open(path))
    sid = bytes.fromhex(v["session_id"])
    assert bytes.fromhex(v["prologue"]) == b"keybroker direct v2" + sid
    terminal, market = side(v, True), side(v, False)

    hello = frame(0x01, sid + terminal.write_message())
    assert hello.hex() == v["hello_frame"], "hello"
    market.read_message(hello[5 + 16:])
    hello_ok = frame(0x02, market.write_message())
    assert hello_ok.hex() == v["hello_ok_frame"], "hello_ok"
    terminal.read_message(hello_ok[5:])
    assert terminal.handshake_finished and market.handshake_finished

    request = bytes.fromhex(v["request_plaintext"])
    record = frame(0x04, terminal.encrypt(request))
    assert record.hex() == v["record_c2s_0"], "record_c2s_0"
    assert market.decrypt(record[5:]) == request
    answer = bytes.fromhex(v["answer_plaintext"])
    record = frame(0x04, market.encrypt(answer))
    assert record.hex() == v["record_s2c_0"], "record_s2c_0"
    assert terminal.decrypt(record[5:]) == answer
    print("direct.json: ok")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/vectors/direct.json")
