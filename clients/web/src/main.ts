// Entry point: the page and the API share one origin (Envoy serves both), so every call
// goes to window.location.origin.
import { connect } from "./api";
import { App } from "./app";

const api = connect(window.location.origin, window.sessionStorage);
void new App(api).start();
