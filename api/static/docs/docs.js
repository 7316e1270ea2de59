// Starts Swagger UI on the farm's OpenAPI document. A file of its own (not an inline
// script), so the page runs under a Content-Security-Policy without 'unsafe-inline'.
"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    domNode: root,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    // No badge fetched from validator.swagger.io: the page talks to this server only.
    validatorUrl: null,
    persistAuthorization: false,
    tryItOutEnabled: false,
  });
})();
