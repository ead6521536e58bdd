"""An HTTP(S) request with Python's urllib (a client we did not write).

Usage: http_get.py URL [--ca FILE] [--header 'Name: value']... [--form key=value]
Prints one JSON object: {"status", "headers" (names in lower case), "body"}; redirects are not
followed.
"""
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

args = sys.argv[1:]
url = args.pop(0)
ca, headers, form = None, {}, None
while args:
    a = args.pop(0)
    if a == "--ca":
        ca = args.pop(0)
    elif a == "--header":
        k, v = args.pop(0).split(":", 1)
        headers[k.strip()] = v.strip()
    elif a == "--form":
        k, v = args.pop(0).split("=", 1)
        form = urllib.parse.urlencode({k: v}).encode()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


ctx = ssl.create_default_context(cafile=ca) if ca else None
opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=ctx))
req = urllib.request.Request(url, data=form, headers=headers)
try:
    r = opener.open(req, timeout=20)
    status, hdrs, body = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
except urllib.error.HTTPError as e:
    status, hdrs, body = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
print(json.dumps({"status": status, "headers": hdrs, "body": body.decode("utf-8", "replace")}))
