#!/usr/bin/env python3
"""A registry token server for tests (the bearer flow of the distribution token spec).

Serves GET /token?service=...&scope=...: with valid basic credentials it returns a JWT
(RS256, signed by the openssl CLI, certificate chain in the x5c header) granting the
requested actions; without them, 401. GET /stats returns {"tokens": N}. Runs until killed;
writes its port to --port-file once listening.
"""
import argparse, base64, json, os, subprocess, sys, threading, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--service", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--refresh-token", default=None,
                    help="an OAuth2 refresh token (docker identitytoken) accepted by POST /token")
    args = ap.parse_args()
    der = subprocess.run(["openssl", "x509", "-in", args.cert, "-outform", "DER"],
                         check=True, capture_output=True).stdout
    x5c = [base64.b64encode(der).decode()]
    lock = threading.Lock()
    stats = {"tokens": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, body, extra=None):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            # OAuth2 refresh-token grant, as docker's identity tokens use.
            if urlparse(self.path).path != "/token":
                return self.reply(404, {"error": "not found"})
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            ok = (args.refresh_token is not None
                  and form.get("grant_type") == ["refresh_token"]
                  and form.get("refresh_token") == [args.refresh_token])
            if not ok:
                return self.reply(401, {"error": "invalid_grant"})
            self.issue(form.get("scope", []))

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/stats":
                with lock:
                    return self.reply(200, dict(stats))
            if url.path != "/token":
                return self.reply(404, {"error": "not found"})
            auth = self.headers.get("Authorization", "")
            expected = "Basic " + base64.b64encode(f"{args.user}:{args.password}".encode()).decode()
            if auth != expected:
                return self.reply(401, {"error": "bad credentials"},
                                  {"WWW-Authenticate": 'Basic realm="token"'})
            self.issue(parse_qs(url.query).get("scope", []))

        def issue(self, scopes):
            access = []
            for scope in scopes:
                for s in scope.split(" "):
                    parts = s.split(":")
                    if len(parts) == 3 and parts[0] == "repository":
                        access.append({"type": "repository", "name": parts[1],
                                       "actions": parts[2].split(",")})
            now = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": x5c}
            claims = {"iss": args.issuer, "sub": args.user, "aud": args.service,
                      "exp": now + 300, "nbf": now - 10, "iat": now,
                      "jti": str(uuid.uuid4()), "access": access}
            signing_input = (b64url(json.dumps(header).encode()) + "." +
                             b64url(json.dumps(claims).encode())).encode()
            sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", args.key],
                                 input=signing_input, check=True, capture_output=True).stdout
            token = signing_input.decode() + "." + b64url(sig)
            with lock:
                stats["tokens"] += 1
            self.reply(200, {"token": token, "access_token": token, "expires_in": 300})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, args.port_file)
    server.serve_forever()

if __name__ == "__main__":
    sys.exit(main())
