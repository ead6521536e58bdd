"""A real HTTP server (Python's http.server) that records every POST it receives.

Usage: webhook_receiver.py OUT.jsonl
Prints `listening on PORT`, then appends one JSON line per request: {"path", "body"}.
"""
import http.server
import json
import sys

out = open(sys.argv[1], "a", encoding="utf-8")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode("utf-8", "replace")
        out.write(json.dumps({"path": self.path, "body": body}) + "\n")
        out.flush()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("listening on", server.server_address[1], flush=True)
server.serve_forever()
