"""OutputProcessor: turns a request's new tokens into RequestOutputs: incremental text (never a split character),
stop token ids, stop strings (matched across token boundaries, cut from the text, and text that could still become
one held back until decided) and finish reasons."""

from __future__ import annotations

from lamina.engine.request import Request, RequestOutput, TopLogprobs
from lamina.tokenizer import StreamDecoder, Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def attach(self, request: Request) -> None:
        request.decoder = StreamDecoder(self.tokenizer)

    def token(
        self,
        request: Request,
        token: int,
        logprob: float | None,
        top: TopLogprobs | None,
        *,
        complete: bool = False,
        after: int = 0,
    ) -> RequestOutput:
        """The output for a token just sampled (already in `request.output`, followed there by `after` more tokens
        of the same step: a verified draft gives several). Its finish_reason is "stop" when the token is a stop token
        (which is then not part of the completion), completes a stop string or completes the request's
        structured-output constraint (`complete`), "length" when it is the step's last token and the request has
        reached its limit (`request.status` says so), else None. A token that finishes the request takes the tokens
        after it out of the output."""
        if token in request.stop_ids:
            del request.output[len(request.output) - after - 1 :]
            return self.finish(request, "stop", stop=(token, logprob, top))
        request.text += request.decoder.add(token)
        reason = None
        if complete or self._stop_string(request) is not None:
            reason = "stop"
        elif after == 0 and request.finish_reason == "length":
            reason = "length"
        if reason is not None:
            if after:
                del request.output[len(request.output) - after :]
            return self.finish(request, reason, token, logprob, top)
        held = self._held(request)
        text = request.text[request.emitted : len(request.text) - held]
        request.emitted = len(request.text) - held
        return self._output(request, token, text, logprob, top, None)

    def finish(
        self,
        request: Request,
        reason: str,
        token: int | None = None,
        logprob: float | None = None,
        top: TopLogprobs | None = None,
        *,
        stop: tuple[int, float | None, TopLogprobs | None] | None = None,
    ) -> RequestOutput:
        """The last output of a request: the rest of its text, up to a stop string if one appeared. `stop`: the stop
        token that finished it, with its log-probability and alternatives (RequestOutput.stop_token)."""
        request.text += request.decoder.flush()
        cut = self._stop_string(request)
        if cut is not None:
            reason = "stop"
        end = len(request.text) if cut is None else max(cut, request.emitted)
        text = request.text[request.emitted : end]
        request.emitted = end
        return self._output(request, token, text, logprob, top, reason, stop)

    @staticmethod
    def failed(request: Request, error: BaseException | None) -> RequestOutput:
        """What a request gets when the engine gives up on it: an error (a failed step), or "abort" (shutdown)."""
        reason = "error" if error is not None else "abort"
        return RequestOutput(request.request_id, None, "", None, None, reason, len(request.prompt), 0, error=error)

    @staticmethod
    def _output(request: Request, token, text, logprob, top, reason, stop=None) -> RequestOutput:
        prompt_logprobs = None
        if request.params.prompt_logprobs is not None and not request.reported_prompt:
            prompt_logprobs = (None, *request.prompt_logprobs)
            request.reported_prompt = True
        completion = len(request.output)
        unmet = reason is not None and request.matcher is not None and not request.matcher.is_accepting()
        return RequestOutput(
            request.request_id,
            token,
            text,
            logprob,
            top,
            reason,
            len(request.prompt),
            completion,
            prompt_logprobs,
            cached_tokens=request.cached_tokens or 0,
            constraint_unmet=unmet,
            **dict(zip(("stop_token", "stop_logprob", "stop_top_logprobs"), stop or ())),
        )

    @staticmethod
    def _stop_string(request: Request) -> int | None:
        """Where the first stop string starts in the text, if one has appeared (searched only where it can be new)."""
        stop = request.params.stop
        if not stop:
            return None
        lo = max(0, request.emitted - max(len(s) for s in stop) + 1)
        found = [i for i in (request.text.find(s, lo) for s in stop) if i >= 0]
        return min(found) if found else None

    @staticmethod
    def _held(request: Request) -> int:
        """How much of the text's end to hold back: the longest tail that could still become a stop string."""
        held = 0
        for s in request.params.stop:
            for n in range(min(len(s) - 1, len(request.text) - request.emitted), held, -1):
                if request.text.endswith(s[:n]):
                    held = n
                    break
        return held
