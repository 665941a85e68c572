// The playground: a thin client of the OpenAI-compatible chat route with streaming (server-sent events).
// Each streamed token becomes a span whose title and data-logprob carry the logprob the sampler reported.
"use strict";
(function () {
  const chat = document.getElementById("chat");
  const form = document.getElementById("composer");
  const input = document.getElementById("message");
  const send = document.getElementById("send");
  let messages = [];

  function bubble(role, text) {
    document.getElementById("chat-empty")?.remove();
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    if (text) div.textContent = text;
    chat.appendChild(div);
    chat.scrollTop = chat.scrollHeight;
    return div;
  }

  function addTokens(target, delta, logprobs) {
    if (logprobs && logprobs.content && logprobs.content.length) {
      for (const entry of logprobs.content) {
        const span = document.createElement("span");
        span.className = "tok";
        span.textContent = entry.token;
        span.dataset.logprob = entry.logprob;
        span.title = span.dataset.tip = `logprob ${entry.logprob.toFixed(3)} · p ${(Math.exp(entry.logprob) * 100).toFixed(1)} %`;
        target.appendChild(span);
      }
    } else if (delta) {
      target.appendChild(document.createTextNode(delta));
    }
    chat.scrollTop = chat.scrollHeight;
  }

  function number(id) {
    const value = document.getElementById(id).value;
    return value === "" ? undefined : Number(value);
  }

  async function ask(text) {
    const system = document.getElementById("system").value.trim();
    messages.push({ role: "user", content: text });
    bubble("user", text);
    const answer = bubble("assistant", "");
    chat.dataset.state = "streaming";
    send.disabled = true;
    const body = { model: document.getElementById("model").value, stream: true, logprobs: true,
                   messages: system ? [{ role: "system", content: system }, ...messages] : messages,
                   temperature: number("temperature"), top_p: number("top-p"), max_tokens: number("max-tokens"),
                   seed: number("seed") };
    let content = "";
    try {
      const response = await fetch("/v1/chat/completions", { method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() }, body: JSON.stringify(body) });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || data.detail || `${response.status}`);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            for (const choice of chunk.choices || []) {
              const delta = (choice.delta && choice.delta.content) || "";
              content += delta;
              addTokens(answer, delta, choice.logprobs);
            }
          }
        }
      }
      messages.push({ role: "assistant", content });
      chat.dataset.state = "done";
    } catch (error) {
      messages.pop();
      answer.classList.add("error");
      answer.textContent = `Sampling failed: ${error.message}`;
      chat.dataset.state = "error";
    } finally {
      send.disabled = false;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || send.disabled) return;
    input.value = "";
    ask(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("clear").addEventListener("click", () => {
    messages = [];
    chat.innerHTML = "";
    chat.dataset.state = "idle";
  });
})();
