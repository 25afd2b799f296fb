#!/usr/bin/env python3
"""A direct-channel terminal written from docs/PROTOCOL.md §3 alone, with
the `noiseprotocol` package: no keybroker code. tests/direct.rs runs it
against the real reference market with an X the broker agreed.

usage: direct_terminal.py SESSION_ID_HEX X_HEX HOST:PORT REQUEST
prints the market's answer (UTF-8) or `alert N`, exits 0 either way.
"""
import socket
import struct
import sys

from noise.connection import NoiseConnection


def frame(ty, payload):
    return bytes([ty]) + struct.pack(">I", len(payload)) + payload


def read_frame(sock):
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise EOFError("the market closed")
        head += chunk
    ty, n = head[0], struct.unpack(">I", head[1:])[0]
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            raise EOFError("the market closed")
        body += chunk
    return ty, body


def main(sid_hex, x_hex, endpoint, request):
    sid, x = bytes.fromhex(sid_hex), bytes.fromhex(x_hex)
    host, port = endpoint.rsplit(":", 1)
    noise = NoiseConnection.from_name(b"Noise_NNpsk0_25519_AESGCM_SHA256")
    noise.set_psks(psk=x)
    noise.set_prologue(b"keybroker direct v2" + sid)
    noise.set_as_initiator()
    noise.start_handshake()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(frame(0x01, sid + noise.write_message()))
        ty, body = read_frame(s)
        if ty == 0x03:
            print("alert", struct.unpack(">H", body)[0])
            return
        assert ty == 0x02, f"expected HelloOk, got {ty:#x}"
        noise.read_message(body)
        assert noise.handshake_finished
        s.sendall(frame(0x04, noise.encrypt(request.encode())))
        ty, body = read_frame(s)
        if ty == 0x03:
            print("alert", struct.unpack(">H", body)[0])
            return
        assert ty == 0x04, f"expected a Record, got {ty:#x}"
        print(noise.decrypt(body).decode())


if __name__ == "__main__":
    main(*sys.argv[1:5])
