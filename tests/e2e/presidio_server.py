"""Presidio's analyzer behind its REST contract, for the e2e tests.

The upstream server (presidio-analyzer/app.py in the presidio repository,
a Flask app) answers `POST /analyze` with `{"text", "language"}` by a list
of `RecognizerResult.to_dict()` (`entity_type`, `start`, `end`, `score`,
`analysis_explanation`). This serves the same contract with the standard
library's HTTP server and the real `presidio_analyzer` engine from PyPI,
configured with its predefined *pattern* recognizers only (e-mail, credit
card, IBAN, phone, ...): the spaCy models its NER recognizers need are not
in the package registries, so the NLP engine is a blank spaCy pipeline
(tokens only) and the NER-based recognizers are left out.

Usage: python presidio_server.py PORT  (prints "presidio listening on PORT").
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import spacy
from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
from presidio_analyzer.nlp_engine import SpacyNlpEngine


class BlankSpacyEngine(SpacyNlpEngine):
    """A spaCy NLP engine on a blank English pipeline: no model download."""

    def __init__(self):
        super().__init__(models=[{"lang_code": "en", "model_name": "blank"}])

    def load(self):
        self.nlp = {"en": spacy.blank("en")}


def engine() -> AnalyzerEngine:
    nlp = BlankSpacyEngine()
    nlp.load()
    registry = RecognizerRegistry()
    registry.load_predefined_recognizers(nlp_engine=nlp, languages=["en"])
    # Keep what works on text alone: the pattern recognizers.
    for name in ("SpacyRecognizer", "StanzaRecognizer", "TransformersRecognizer"):
        try:
            registry.remove_recognizer(name)
        except Exception:  # not loaded in this version
            pass
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])


ENGINE = engine()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status: int, body) -> None:
        data = json.dumps(body, default=lambda o: o.to_dict(), sort_keys=True).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.answer(200, "Presidio Analyzer service is up")
        else:
            self.answer(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/analyze":
            return self.answer(404, {"error": "not found"})
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
            if not req.get("text"):
                return self.answer(500, {"error": "No text provided"})
            if not req.get("language"):
                return self.answer(500, {"error": "No language provided"})
            results = ENGINE.analyze(text=req["text"], language=req["language"],
                                     score_threshold=req.get("score_threshold"))
            for r in results:
                if hasattr(r, "recognition_metadata"):
                    delattr(r, "recognition_metadata")
            self.answer(200, results)
        except Exception as e:  # the upstream app answers 500 with the error
            self.answer(500, {"error": str(e)})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print(f"presidio listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
